"""Child side of `internlm2.agent.interpreter`: one persistent Python session in its own process.

The parent starts this file as `python -I -c <source>`, so it may import only the standard
library (never `internlm2`, which would pull in torch). It speaks a framed JSON protocol over its
original stdin/stdout (4-byte big-endian length + UTF-8 JSON); fds 0/1/2 are then pointed at
/dev/null and two unlinked capture files, so C-level writes (os.write(1, ...), extension modules)
are captured instead of corrupting the protocol.

Defence in depth (the process boundary, uid, rlimits and network namespace are set up by the
parent): an audit hook refuses process creation, sockets (unless network is allowed), writes
outside the working folder, reads of secrets, rlimit changes and ctypes foreign calls. Audit
hooks are not a security boundary (numpy can read and write raw memory, for example); they turn
the common escapes into clean PermissionErrors while the OS-level limits do the real work.
"""

import ast
import io
import json
import linecache
import math
import os
import re
import resource
import signal
import struct
import sys
import tempfile
import traceback

_HEADER = struct.Struct(">I")


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv(fd):
    (n,) = _HEADER.unpack(_read_exact(fd, 4))
    return json.loads(_read_exact(fd, n).decode("utf-8"))


def _send(fd, obj):
    data = json.dumps(obj).encode("utf-8")
    data = _HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def clip(text, limit):
    """Head + tail of `text` with a marker naming how many characters were cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[len(text) - tail:]}"


class _Capture(io.TextIOBase):
    """A text stream that keeps only the first and last `limit // 2` characters written, so a
    cell printing gigabytes costs the kernel O(limit) memory."""

    def __init__(self, limit):
        self.limit, self.half = limit, limit // 2
        self.head, self.nhead, self.tail, self.total = [], 0, "", 0

    def writable(self):
        return True

    def isatty(self):
        return False

    @property
    def encoding(self):
        return "utf-8"

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        self.total += n
        if self.nhead < self.half:
            take = s[: self.half - self.nhead]
            self.head.append(take)
            self.nhead += len(take)
            s = s[len(take):]
        if s:
            keep = self.limit - self.half
            self.tail += s
            if len(self.tail) > 2 * keep:
                self.tail = self.tail[-keep:]
        return n

    def text(self):
        head = "".join(self.head)
        if self.total <= self.limit:
            return head + self.tail
        keep = self.limit - self.half
        return f"{head}\n... [{self.total - self.limit} characters cut] ...\n{self.tail[-keep:]}"


def _fd_text(fd, limit):
    """Drain a capture file written at the fd level (head and tail only) and empty it."""
    size = os.fstat(fd).st_size
    if size <= limit:
        text = os.pread(fd, size, 0).decode("utf-8", "replace")
    else:
        half = limit // 2
        text = (os.pread(fd, half, 0).decode("utf-8", "replace")
                + f"\n... [{size - limit} bytes cut] ...\n"
                + os.pread(fd, limit - half, size - (limit - half)).decode("utf-8", "replace"))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return text


class _Policy:
    """The audit-hook policy. Writes: only inside the working folder (its `.sandbox/tmp` is TMPDIR)
    and /dev/null. Reads: everything except /proc/<other pid>, and the `deny_read` prefixes (shadow
    files, /root, /home, ssh config, mounted secrets, the parent's home) unless a path is under an
    `allow_read` prefix (sys.path, the interpreter prefix, the working folder). Process creation,
    signals to other processes, rlimit changes, ctypes library loading and foreign calls are
    refused; so are sockets other than AF_UNIX and every connect/bind/sendto/DNS lookup, unless
    `network`."""

    PROCESS = frozenset({
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "subprocess.Popen", "pty.spawn", "os.startfile", "webbrowser.open", "os.killpg"})
    CTYPES = frozenset({
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
        "ctypes.cdata", "ctypes.string_at", "ctypes.wstring_at"})
    NET = frozenset({
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex"})
    # event -> indexes of (path, dir_fd) pairs that must stay inside the working folder
    WRITE = {"os.mkdir": [(0, 2)], "os.rmdir": [(0, 1)], "os.remove": [(0, 1)],
             "os.rename": [(0, 2), (1, 3)], "os.symlink": [(1, 2)], "os.link": [(0, 2), (1, 3)],
             "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.truncate": [(0, None)],
             "os.utime": [(0, 4)], "os.chflags": [(0, None)], "os.lchflags": [(0, None)],
             "os.setxattr": [(0, None)], "os.removexattr": [(0, None)], "os.mkfifo": [(0, 2)],
             "os.mknod": [(0, 3)]}
    READ = frozenset({"os.listdir", "os.scandir"})
    _PROC = re.compile(r"^/proc/(\d+)(/|$)")

    def __init__(self, cfg):
        self.workdir = os.path.realpath(cfg["workdir"])
        self.network = bool(cfg["network"])
        self.deny = [os.path.realpath(p) for p in cfg["deny_read"]]
        self.allow = [os.path.realpath(p) for p in cfg["allow_read"]] + [self.workdir]
        self.pid = os.getpid()
        self.kernel_call = False  # set only while the kernel itself changes rlimits

    @staticmethod
    def _under(path, prefixes):
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)

    def _resolve(self, path, dir_fd=None):
        if isinstance(path, int):
            return None  # an fd that is already open: its opening was checked
        path = os.fsdecode(path)
        base = os.getcwd()
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            base = os.readlink(f"/proc/self/fd/{dir_fd}")
        return os.path.realpath(os.path.join(base, path))

    def check_write(self, path, dir_fd=None):
        p = self._resolve(path, dir_fd)
        if p is None or p == "/dev/null" or self._under(p, [self.workdir]):
            return
        raise PermissionError(
            f"sandbox: writing {path!r} outside the working folder is not allowed")

    def check_read(self, path, dir_fd=None):
        p = self._resolve(path, dir_fd)
        if p is None:
            return
        m = self._PROC.match(p)
        if m and int(m.group(1)) != self.pid:
            raise PermissionError(f"sandbox: reading another process's {p!r} is not allowed")
        if self._under(p, self.deny) and not self._under(p, self.allow):
            raise PermissionError(f"sandbox: reading {path!r} is not allowed")

    def __call__(self, event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC))
            (self.check_write if writing else self.check_read)(path)
        elif event in self.WRITE:
            for i, j in self.WRITE[event]:
                if i < len(args) and args[i] is not None:
                    self.check_write(args[i], args[j] if j is not None and j < len(args) else None)
        elif event in self.READ:
            if args and args[0] is not None:
                self.check_read(args[0])
        elif event in self.PROCESS:
            raise PermissionError(f"sandbox: {event} is not allowed (no new processes)")
        elif event == "os.kill":
            if args[0] not in (0, self.pid):
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event in self.CTYPES:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in ("resource.setrlimit", "resource.prlimit"):
            if not self.kernel_call and len(args) > 1 and args[-1] is not None:
                raise PermissionError("sandbox: changing resource limits is not allowed")
        elif event == "import" and args[0] in ("_posixsubprocess", "_ctypes"):
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif not self.network:
            if event == "socket.__new__":
                import socket as _s
                if args[1] != _s.AF_UNIX:
                    raise PermissionError("sandbox: network access is disabled")
            elif event in self.NET:
                raise PermissionError("sandbox: network access is disabled")


class Kernel:
    def __init__(self, cfg, out_fd):
        self.cfg, self.out_fd = cfg, out_fd
        self.limit = int(cfg["max_output_chars"])
        self.ns = {"__name__": "__main__", "__builtins__": __builtins__}
        self.cell = 0
        self.in_cell = False
        tmp = cfg["tmpdir"]
        self._files = [tempfile.TemporaryFile(dir=tmp) for _ in range(2)]
        self.fd_out, self.fd_err = (f.fileno() for f in self._files)

    def _on_sigint(self, signum, frame):
        if self.in_cell:
            raise KeyboardInterrupt

    def _on_sigxcpu(self, signum, frame):
        if self.in_cell:
            raise TimeoutError(f"CPU time limit of {self.cfg['cpu_seconds']} s exceeded")

    def _cpu_budget(self, policy):
        used = resource.getrusage(resource.RUSAGE_SELF)
        seconds = math.ceil(used.ru_utime + used.ru_stime + float(self.cfg["cpu_seconds"]))
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard != resource.RLIM_INFINITY:
            seconds = min(seconds, hard)
        policy.kernel_call = True
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (seconds, hard))
        finally:
            policy.kernel_call = False

    def _format_error(self, exc):
        tb = exc.__traceback__
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
            tb = tb.tb_next
        te = traceback.TracebackException(type(exc), exc, tb, compact=True)
        for t in [te, *self._chain(te)]:  # the audit hook's frames are the sandbox, not the cell
            t.stack = traceback.StackSummary.from_list(
                [f for f in t.stack if f.filename != "<string>"])
        return clip("".join(te.format()), self.limit)

    @staticmethod
    def _chain(te):
        seen = []
        while te is not None and len(seen) < 50:
            te = te.__cause__ or te.__context__
            if te is not None:
                seen.append(te)
        return seen

    def _save_figures(self, err):
        plt = sys.modules.get("matplotlib.pyplot")
        paths = []
        if plt is None:
            return paths
        try:
            for k, num in enumerate(plt.get_fignums()):
                path = os.path.join(self.cfg["workdir"], f"figure-{self.cell:03d}-{k}.png")
                n = 1
                while os.path.exists(path):
                    path = os.path.join(self.cfg["workdir"], f"figure-{self.cell:03d}-{k}-{n}.png")
                    n += 1
                plt.figure(num).savefig(path, format="png")
                paths.append(path)
        except Exception as exc:  # a broken figure must not lose the cell's other results
            err.write(f"\n[saving figures failed: {exc!r}]\n")
        finally:
            plt.close("all")
        return paths

    def run(self, code, policy):
        self.cell += 1
        filename = f"<cell-{self.cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        out, err = _Capture(self.limit), _Capture(self.limit)
        value = error = None
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        self._cpu_budget(policy)
        try:
            self.in_cell = True
            try:
                tree = ast.parse(code, filename, "exec")
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = ast.Expression(tree.body.pop().value)
                exec(compile(tree, filename, "exec"), self.ns)
                if last is not None:
                    result = eval(compile(last, filename, "eval"), self.ns)
                    if result is not None:
                        self.ns["_"] = result
                        value = clip(repr(result), self.limit)
            except BaseException as exc:  # KeyboardInterrupt and SystemExit end the cell only
                error = self._format_error(exc)
            finally:
                self.in_cell = False
            images = self._save_figures(err)
        finally:
            sys.stdout, sys.stderr = saved
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        stdout = out.text() + _fd_text(self.fd_out, self.limit)
        stderr = err.text() + _fd_text(self.fd_err, self.limit)
        return {"stdout": clip(stdout, self.limit), "stderr": clip(stderr, self.limit),
                "value": value, "error": error, "images": images}


def main():
    in_fd, out_fd = os.dup(0), os.dup(1)
    cfg = _recv(in_fd)
    sys.path[:] = cfg["sys_path"]
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    kernel = Kernel(cfg, out_fd)
    os.dup2(kernel.fd_out, 1)
    os.dup2(kernel.fd_err, 2)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    signal.signal(signal.SIGINT, kernel._on_sigint)
    signal.signal(signal.SIGXCPU, kernel._on_sigxcpu)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG
    import warnings
    warnings.filterwarnings("ignore", message=".*non-interactive.*")
    # Loaded before the hook so numpy's `import ctypes` needs no dlopen; subprocess's fork_exec is
    # neutered because calling it directly raises no audit event.
    import _posixsubprocess
    import ctypes  # noqa: F401

    def _refuse(*args, **kwargs):
        raise PermissionError("sandbox: subprocess creation is not allowed")

    _posixsubprocess.fork_exec = _refuse
    policy = _Policy(cfg)
    sys.addaudithook(policy)
    _send(out_fd, {"op": "hello", "pid": os.getpid(), "uid": os.getuid(),
                   "python": sys.version.split()[0]})
    while True:
        try:
            msg = _recv(in_fd)
        except EOFError:
            return
        if msg.get("op") == "shutdown":
            return
        try:
            reply = kernel.run(msg["code"], policy)
        except BaseException as exc:  # an interrupt that landed in the kernel's own bookkeeping
            kernel.in_cell = False
            reply = {"stdout": "", "stderr": "", "value": None, "images": [],
                     "error": "".join(traceback.format_exception_only(type(exc), exc))}
        reply["id"] = msg.get("id")
        _send(out_fd, reply)


if __name__ == "__main__":
    main()
