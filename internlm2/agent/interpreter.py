"""A sandboxed, persistent Python interpreter for the code-interpreter tool.

Lagent's interpreter runs the model's code in a Jupyter kernel with the user's full rights. Here
each `Interpreter` owns one child process (`_kernel.py`, standard library only, never torch)
that keeps the session's state across cells and is contained by, strongest first:

- a separate process in its own session, killed and restarted when a cell ignores an interrupt;
- when the parent is root: an unprivileged uid/gid (nobody by default) owning only the working
  folder, so file permissions protect /etc/shadow, /root and other processes' /proc files; if the
  Python installation is not reachable by that uid (pyenv under /root), its top folder is
  bind-mounted read-only, in a private mount namespace, under a reachable stage folder (likewise
  the working folder, read-write, when it sits under a private folder such as pytest's tmp);
- a private network namespace with only a downed loopback (root, or an unprivileged user
  namespace where the kernel allows one);
- rlimits: address space, CPU seconds per cell, processes, file size, open files, no core dumps;
- a scrubbed environment (`python -I`, HOME = working folder, no parent variables), with the
  parent's sys.path passed explicitly so numpy, pandas and matplotlib import as usual;
- an audit hook refusing process creation, sockets, writes outside the working folder, reads of
  secrets, rlimit changes and ctypes (see `_kernel._Policy` for the exact policy).

Residual risk, honestly: audit hooks are a Python-level tripwire, not a boundary; code that gets
raw memory access (numpy arrays over arbitrary addresses, a C extension) can disable them. What
then remains is the OS layer above, which is only complete when the parent runs as root. As a
normal user the child keeps the user's uid: rlimits, the network namespace (if available) and
the audit hook are the protection, and anything the user can read is readable in principle.
Threads started by a cell keep running after it ends (they share the per-cell CPU budget), and
a symlink swapped between the hook's check and the open (a race needing threads) can defeat the
path checks; the uid boundary still holds there. `isolation` reports what is really active.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 << 20
_KERNEL_SOURCE = (Path(__file__).with_name("_kernel.py")).read_text(encoding="utf-8")
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_DENY_READ = ["/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers",
              "/etc/sudoers.d", "/etc/ssh", "/root", "/home", "/run/secrets", "/var/run/secrets"]


@dataclass
class InterpreterResult:
    """What one cell produced. `value` is the repr of a trailing expression (as a notebook shows
    it), `error` the traceback text filtered to the cell's frames, `images` the PNG files of the
    matplotlib figures the cell left open."""

    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    error: str | None = None
    images: list[str] = field(default_factory=list)
    timed_out: bool = False
    restarted: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_text(self) -> str:
        """The observation for the `environment name=<|interpreter|>` turn."""
        parts = [s.rstrip("\n") for s in (self.stdout, self.stderr) if s]
        if self.value is not None:
            parts.append(self.value)
        if self.error is not None:
            parts.append(self.error.rstrip("\n"))
        parts += [f"[image: {os.path.basename(p)}]" for p in self.images]
        return "\n".join(parts) if parts else "(no output)"


class _KernelDied(RuntimeError):
    pass


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether `uid` may traverse every folder above `path` (a conservative mode-bit check)."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        st = os.stat(os.path.join(*parts[:i]))
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _blocked_root(path: str, uid: int, gid: int) -> str | None:
    """The highest folder under an untraversable one that `path` lies in (what to bind-mount)."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        if not _reachable(os.path.join(*parts[: i + 1]), uid, gid):
            return os.path.join(*parts[: i + 1])
    return None


def _count_processes(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = os.stat(f"/proc/{name}")
                if st.st_uid == uid:
                    n += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return n


class Interpreter:
    """A persistent, sandboxed Python session. Use as a context manager or call `close()`.

    workdir: the session's working folder and HOME (None: a private temporary folder, removed on
        close; a given folder is kept and, when running as root, chowned to the sandbox uid).
    timeout: wall-clock seconds per cell (overridable per `run`); then SIGINT, then after
        `interrupt_grace_s` a kill and restart.
    memory_mb: RLIMIT_AS of the child (numpy + pandas + matplotlib need ~400 MB of it).
    cpu_seconds: CPU budget per cell (RLIMIT_CPU soft limit, whole seconds; threads share it);
        exceeding it raises TimeoutError in the cell.
    max_processes: RLIMIT_NPROC above what the sandbox uid already runs (threads count too).
    max_output_chars: stdout, stderr, value and traceback are each cut to this (head + tail).
    network: False refuses sockets (network namespace where possible, audit hook always).
    uid: the unprivileged user a root parent drops to ("nobody"); None keeps the parent's uid.
    deny_read: extra path prefixes the audit hook refuses to read.
    After start, `isolation` says what is really active (uid, network mode, mounts, rlimits).
    Not thread-safe: one caller at a time per instance.
    """

    def __init__(self, workdir: str | os.PathLike | None = None, timeout: float = 30.0,
                 memory_mb: int = 1024, cpu_seconds: float = 60.0, max_processes: int = 64,
                 max_output_chars: int = 10_000, network: bool = False, *,
                 uid: int | str | None = "nobody", interrupt_grace_s: float = 2.0,
                 file_size_mb: int = 256, max_open_files: int = 256,
                 deny_read: list[str] | tuple[str, ...] = ()) -> None:
        for name, v in [("timeout", timeout), ("memory_mb", memory_mb),
                        ("cpu_seconds", cpu_seconds),
                        ("max_processes", max_processes), ("max_output_chars", max_output_chars),
                        ("interrupt_grace_s", interrupt_grace_s), ("file_size_mb", file_size_mb),
                        ("max_open_files", max_open_files)]:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Interpreter: {name} must be a positive number, got {v!r}")
        self.timeout, self.memory_mb, self.cpu_seconds = float(timeout), int(memory_mb), cpu_seconds
        self.max_processes, self.max_output_chars = int(max_processes), int(max_output_chars)
        self.network, self.interrupt_grace_s = bool(network), float(interrupt_grace_s)
        self.file_size_mb, self.max_open_files = int(file_size_mb), int(max_open_files)
        self._owns_workdir = workdir is None
        self.workdir = os.path.realpath(tempfile.mkdtemp(prefix="internlm2-interp-")
                                        if workdir is None else workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._uid = self._gid = None
        if os.geteuid() == 0 and uid is not None:
            entry = pwd.getpwnam(uid) if isinstance(uid, str) else pwd.getpwuid(uid)
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        home = os.path.expanduser("~")
        self._deny = _DENY_READ + ([home] if home not in ("/", "") else []) + list(deny_read)
        self._libc = _libc()
        self._proc: subprocess.Popen | None = None
        self._stage: str | None = None
        self._mounts: dict[str, str] = {}
        self._buf = bytearray()
        self._next_id = 0
        self.isolation: dict[str, Any] = {}
        self._start()

    # ----------------------------------------------------------------------------- lifecycle
    def _sandbox_dirs(self) -> tuple[str, str, str]:
        base = os.path.join(self.workdir, ".sandbox")
        tmp, mpl = os.path.join(base, "tmp"), os.path.join(base, "mpl")
        for d in (tmp, mpl):
            os.makedirs(d, exist_ok=True)
        if self._uid is not None:
            targets = [self.workdir, base, tmp, mpl]
            if self._owns_workdir:
                targets = [os.path.join(r, n) for r, ds, fs in os.walk(self.workdir)
                           for n in ds + fs] + [self.workdir]
            for p in targets:
                os.lchown(p, self._uid, self._gid)
        return base, tmp, mpl

    def _plan_mounts(self, paths: list[str]) -> dict[str, str]:
        """Folders the sandbox uid cannot reach (pyenv under /root, a workdir under a private
        folder) -> mount points in a private stage folder where the child sees them."""
        mounts: dict[str, str] = {}

        def add(src: str) -> None:
            if self._stage is None:
                self._stage = tempfile.mkdtemp(prefix="internlm2-sandbox-")
                os.chown(self._stage, self._uid, self._gid)
            dst = os.path.join(self._stage, str(len(mounts)))
            os.makedirs(dst, exist_ok=True)
            mounts[src] = dst

        for p in paths:
            root = _blocked_root(p, self._uid, self._gid) if os.path.exists(p) else None
            if root and root not in mounts:
                add(root)
        if not _reachable(self.workdir, self._uid, self._gid) and self.workdir not in mounts:
            add(self.workdir)  # only the working folder itself, not its private parents
        return mounts

    @staticmethod
    def _translate(path: str, mounts: dict[str, str], back: bool = False) -> str:
        pairs = [(d, s) if back else (s, d) for s, d in mounts.items()]
        for src, dst in sorted(pairs, key=lambda sd: -len(sd[0])):
            if path == src or path.startswith(src + "/"):
                return dst + path[len(src):]
        return path

    def _preexec(self, mounts: dict[str, str], nproc: int, drop: bool, cwd: str,
                 namespaces: bool) -> Any:
        libc, network, workdir = self._libc, self.network, self.workdir
        uid, gid = self._uid, self._gid
        import resource

        limits = [(resource.RLIMIT_AS, self.memory_mb << 20), (resource.RLIMIT_NPROC, nproc),
                  (resource.RLIMIT_FSIZE, self.file_size_mb << 20),
                  (resource.RLIMIT_NOFILE, self.max_open_files), (resource.RLIMIT_CORE, 0)]

        def fail(what: str) -> None:
            raise OSError(ctypes.get_errno(), f"sandbox setup: {what}")

        def run() -> None:
            flags = (0 if network or not namespaces else _CLONE_NEWNET) | (
                _CLONE_NEWNS if mounts else 0)
            if flags and libc is not None and libc.unshare(flags) != 0:
                if mounts or os.geteuid() == 0:
                    fail("unshare")
                real_uid, real_gid = os.getuid(), os.getgid()  # unprivileged: user namespace
                if libc.unshare(_CLONE_NEWUSER | flags) == 0:
                    for f, text in [("setgroups", "deny"), ("uid_map", f"{real_uid} {real_uid} 1"),
                                    ("gid_map", f"{real_gid} {real_gid} 1")]:
                        fd = os.open(f"/proc/self/{f}", os.O_WRONLY)
                        os.write(fd, text.encode())
                        os.close(fd)
            if mounts:
                if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                    fail("make / private")
                for src, dst in mounts.items():
                    if libc.mount(src.encode(), dst.encode(), None, _MS_BIND | _MS_REC, None) != 0:
                        fail(f"bind {src}")
                    if src != workdir:  # the interpreter's files are read-only in the sandbox
                        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
                        libc.mount(None, dst.encode(), None, flags, None)
            os.chdir(cwd)
            for which, v in limits:
                resource.setrlimit(which, (v, v))
            if drop:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            if libc is not None:
                libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        return run

    def _start(self) -> None:
        base, tmp, mpl = self._sandbox_dirs()
        exe = os.path.realpath(sys.executable)
        sys_path = [p for p in sys.path if p and os.path.isabs(p) and os.path.exists(p)]
        prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix})
        # strongest first: (drop privileges, use namespaces); each failure falls back a step
        attempts = [(False, True), (False, False)]
        if self._uid is not None:
            attempts.insert(0, (True, True))
        last_error: Exception | None = None
        for drop, namespaces in attempts:
            mounts = self._plan_mounts([exe] + sys_path + prefixes) if drop else {}
            target = self._uid if drop else os.getuid()
            nproc = _count_processes(target) + self.max_processes

            def tr(p: str, mounts: dict[str, str] = mounts) -> str:
                return self._translate(p, mounts)

            wd = tr(self.workdir)  # where the child sees its working folder
            # nothing of the parent's environment; PYTHON* variables are ignored under -I anyway
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": wd, "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "MPLBACKEND": "Agg", "MPLCONFIGDIR": tr(mpl),
                   "TMPDIR": tr(tmp), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            cfg = {"sys_path": [tr(p) for p in sys_path], "workdir": wd, "tmpdir": tr(tmp),
                   "network": self.network, "cpu_seconds": self.cpu_seconds,
                   "max_output_chars": self.max_output_chars, "deny_read": self._deny,
                   "allow_read": [tr(p) for p in sys_path + prefixes] + list(mounts.values())}
            log = open(os.path.join(base, "kernel.log"), "ab")
            try:
                self._proc = subprocess.Popen(
                    [tr(exe), "-I", "-c", _KERNEL_SOURCE], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, env=env,
                    # namespaces, mounts, rlimits and the uid drop must happen between fork and
                    # exec; only plain os.* and ctypes calls run there.
                    preexec_fn=self._preexec(  # noqa: PLW1509
                        mounts, nproc, drop, wd, namespaces),
                    start_new_session=True)
                self._buf.clear()
                self._send(cfg)
                hello = self._recv(time.monotonic() + 60.0)
                if hello is None or hello.get("op") != "hello":
                    raise _KernelDied("no hello from the kernel within 60 s")
            except (OSError, subprocess.SubprocessError, _KernelDied) as exc:
                last_error = exc
                self._kill()
                continue
            finally:
                log.close()
            if self._uid is not None and not drop:
                warnings.warn(f"Interpreter: could not drop to uid {self._uid} ({last_error}); "
                              "the sandbox runs with the parent's uid", RuntimeWarning,
                              stacklevel=3)
            self._mounts = mounts
            self.isolation = {
                "uid": hello["uid"], "dropped_privileges": drop,
                "network": "allowed" if self.network else self._net_mode(),
                "mounts": dict(mounts), "audit_hook": True,
                "rlimits": {"memory_mb": self.memory_mb, "cpu_seconds_per_cell": self.cpu_seconds,
                            "processes": nproc, "file_size_mb": self.file_size_mb,
                            "open_files": self.max_open_files, "core": 0}}
            return
        log_text = Path(base, "kernel.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"Interpreter: could not start the Python kernel: {last_error}\n{log_text}")

    def _net_mode(self) -> str:
        try:
            child = os.stat(f"/proc/{self._proc.pid}/ns/net").st_ino
            same = child == os.stat("/proc/self/ns/net").st_ino
        except OSError:
            return "audit-hook"
        return "audit-hook" if same else "netns"

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                try:  # closing flushes a buffered write to a child that is gone
                    f.close()
                except OSError:
                    pass

    def restart(self) -> None:
        """Kill the session (all state is lost) and start a fresh one."""
        self._kill()
        self._start()

    def close(self) -> None:
        """Stop the session; a temporary working folder is removed."""
        if self._proc is not None:
            try:
                self._send({"op": "shutdown"})
                self._proc.wait(timeout=1.0)
            except (OSError, subprocess.TimeoutExpired, _KernelDied):
                pass
            self._kill()
        if self._owns_workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._stage is not None:  # empty mount points (the mounts lived in the child only)
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    def __enter__(self) -> Interpreter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------------------- protocol
    def _send(self, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self._proc.stdin.write(_HEADER.pack(len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise _KernelDied("the kernel's input pipe is closed") from exc

    def _recv(self, deadline: float) -> dict | None:
        """One frame, or None at the deadline (a partial frame stays buffered)."""
        fd = self._proc.stdout.fileno()
        while True:
            if len(self._buf) >= 4:
                (n,) = _HEADER.unpack(self._buf[:4])
                if n > _MAX_FRAME:
                    raise _KernelDied(f"frame of {n} bytes exceeds the protocol limit")
                if len(self._buf) >= 4 + n:
                    frame = bytes(self._buf[4:4 + n])
                    del self._buf[:4 + n]
                    return json.loads(frame.decode("utf-8"))
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = self._proc.wait()
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    raise _KernelDied(f"the Python kernel died ({how})")
                self._buf += chunk

    # ----------------------------------------------------------------------------- API
    def run(self, code: str, timeout: float | None = None) -> InterpreterResult:
        """Execute one cell. A cell over the wall-clock `timeout` gets a KeyboardInterrupt (state
        kept); if it does not stop within `interrupt_grace_s`, the session is killed and
        restarted (state lost, `restarted=True`)."""
        if not isinstance(code, str):
            raise TypeError(f"Interpreter.run: code must be str, got {type(code).__name__}")
        if self._proc is None:
            raise RuntimeError("Interpreter.run: the interpreter is closed")
        limit = self.timeout if timeout is None else float(timeout)
        if not limit > 0:
            raise ValueError(f"Interpreter.run: timeout must be positive, got {timeout!r}")
        t0 = time.monotonic()
        self._next_id += 1
        res = InterpreterResult()
        try:
            self._send({"op": "run", "id": self._next_id, "code": code})
            reply = self._recv(t0 + limit)
            if reply is None:
                res.timed_out = True
                os.kill(self._proc.pid, signal.SIGINT)
                reply = self._recv(time.monotonic() + self.interrupt_grace_s)
            if reply is None:
                self.restart()
                res.restarted = True
                res.error = (f"TimeoutError: the cell ran past {limit:g} s and did not stop on "
                             "interrupt; the session was restarted and its state is lost")
        except _KernelDied as exc:
            self.restart()
            res.restarted = True
            res.error = f"{exc}; the session was restarted and its state is lost"
            reply = None
        if reply is not None:
            res.stdout, res.stderr, res.value = reply["stdout"], reply["stderr"], reply["value"]
            res.error = reply["error"]
            res.images = [self._translate(p, self._mounts, back=True) for p in reply["images"]]
            if res.timed_out:
                res.error = (res.error or "") + (
                    f"TimeoutError: the cell ran past {limit:g} s and was interrupted "
                    "(session state kept)\n")
        res.duration_s = time.monotonic() - t0
        return res

    def upload(self, path_or_bytes: str | os.PathLike | bytes, name: str) -> str:
        """Copy a user's file (the official `user name=file` turn) into the working folder as
        `name`; returns the path inside the sandbox."""
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"Interpreter.upload: name must be a plain file name, got {name!r}")
        dst = os.path.join(self.workdir, name)
        if isinstance(path_or_bytes, (bytes, bytearray)):
            Path(dst).write_bytes(bytes(path_or_bytes))
        else:
            shutil.copyfile(path_or_bytes, dst)
        if self._uid is not None:
            os.chown(dst, self._uid, self._gid)
        return dst
