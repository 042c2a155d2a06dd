"""Hugging Face format in and out: config.json, safetensors (sharded + index), legacy
`pytorch_model*.bin`, generation_config.json, and the LLaMA-layout conversion.

Loading streams tensor by tensor (safetensors `safe_open`) into a model built on the meta
device, so peak memory is about one model plus one tensor. Saving writes shards as they fill
into a temporary sibling folder that is renamed into place only once complete.
See REFERENCE.md section 1 for the layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, ModelConfig
from .model import InternLM2ForCausalLM, InternLM2ForRewardModel

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
IM_END_ID = 92542  # `<|im_end|>` in the official vocabulary

# Files that travel with the weights when a checkpoint is converted.
_AUX_FILES = {GENERATION_CONFIG_NAME, "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja"}
_REMOTE_CODE = {"configuration_internlm2.py", "modeling_internlm2.py"}
class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or does not fit its config."""


# -- config ---------------------------------------------------------------------------------

def _read_json(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (or of a config.json file given directly)."""
    p = Path(path)
    file = p / CONFIG_NAME if p.is_dir() or not p.suffix else p
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    return ModelConfig.from_hf_dict(_read_json(file), str(file))


def llama_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A `LlamaConfig` config.json for the LLaMA layout of `config`.

    Rope settings are written both ways: `rope_parameters` (transformers >= 5, theta inside)
    and the legacy `rope_theta` + `rope_scaling` (transformers 4.x, vLLM, llama.cpp).
    """
    rs = config.rope_scaling
    kind = rs["type"] if rs else "default"
    params: dict[str, Any] = {"rope_type": kind, "rope_theta": float(config.rope_theta)}
    if rs:
        params["factor"] = rs["factor"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": config.bias,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": params,
        "rope_scaling": {"rope_type": kind, "type": kind, "factor": rs["factor"]} if rs else None,
        "rope_theta": float(config.rope_theta),
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


# -- LLaMA layout -----------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LLAMA_TOP = {"model.embed_tokens.weight": "model.tok_embeddings.weight",
              "lm_head.weight": "output.weight", "model.norm.weight": "model.norm.weight"}
_LLAMA_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_OURS_TOP = {v: k for k, v in _LLAMA_TOP.items()}
_OURS_LAYER = {v: k for k, v in _LLAMA_LAYER.items()}
_QKV = ("q_proj", "k_proj", "v_proj")


def _fuse_qkv(parts: dict[str, torch.Tensor], config: ModelConfig, names: dict[str, str],
              where: str) -> torch.Tensor:
    """q/k/v projections -> the grouped wqkv rows [kv group][q_0 .. q_{g-1}, k, v]."""
    nkv, g, d = config.num_key_value_heads, config.q_per_kv, config.head_dim
    rows = {"q_proj": config.num_attention_heads * d, "k_proj": nkv * d, "v_proj": nkv * d}
    trail = tuple(parts["q_proj"].shape[1:])
    for p in _QKV:
        t = parts[p]
        want = (rows[p], config.hidden_size) if t.dim() == 2 else (rows[p],)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{where}: tensor {names[p]!r} has shape {list(t.shape)}, "
                                  f"expected {list(want)}")
    q = parts["q_proj"].reshape(nkv, g, d, *trail)
    k = parts["k_proj"].reshape(nkv, 1, d, *trail)
    v = parts["v_proj"].reshape(nkv, 1, d, *trail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *trail)


def _split_qkv(w: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    nkv, g, d = config.num_key_value_heads, config.q_per_kv, config.head_dim
    trail = tuple(w.shape[1:])
    x = w.reshape(nkv, g + 2, d, *trail)
    return (x[:, :g].reshape(-1, *trail).clone(), x[:, g].reshape(-1, *trail).clone(),
            x[:, g + 1].reshape(-1, *trail).clone())


# A stream item: (name, tensor, file it came from, name in that file).
_Item = tuple[str, torch.Tensor, str, str]


def _to_internlm2_stream(items: Iterable[_Item], config: ModelConfig) -> Iterator[_Item]:
    """Rename LLaMA names to InternLM2 names and fuse q/k/v; other names pass through."""
    pending: dict[tuple[str, str], dict[str, tuple[torch.Tensor, str, str]]] = {}
    for name, t, file, orig in items:
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints carry
            continue
        if name in _LLAMA_TOP:
            yield _LLAMA_TOP[name], t, file, orig
            continue
        m = _LAYER_RE.match(name)
        if m:
            i, rest = m.groups()
            if rest in _LLAMA_LAYER:
                yield f"model.layers.{i}.{_LLAMA_LAYER[rest]}", t, file, orig
                continue
            proj, _, kind = rest.rpartition(".")
            if proj.startswith("self_attn.") and proj[10:] in _QKV and kind in ("weight", "bias"):
                group = pending.setdefault((i, kind), {})
                if proj[10:] in group:
                    raise CheckpointError(f"{file}: tensor {orig!r} appears twice")
                group[proj[10:]] = (t, file, orig)
                if len(group) == 3:
                    del pending[(i, kind)]
                    fused = _fuse_qkv({p: group[p][0] for p in _QKV}, config,
                                      {p: group[p][2] for p in _QKV}, group["q_proj"][1])
                    yield (f"model.layers.{i}.attention.wqkv.{kind}", fused,
                           group["q_proj"][1], group["q_proj"][2])
                continue
        yield name, t, file, orig
    for (i, kind), group in pending.items():
        have = next(iter(group.values()))
        lacking = [f"model.layers.{i}.self_attn.{p}.{kind}" for p in _QKV if p not in group]
        raise CheckpointError(f"{have[1]}: missing tensor(s) {', '.join(lacking)} "
                              f"(needed with {have[2]!r})")


def _to_llama_items(name: str, t: torch.Tensor, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if name in _OURS_TOP:
        yield _OURS_TOP[name], t
        return
    m = _LAYER_RE.match(name)
    if m:
        i, rest = m.groups()
        if rest in _OURS_LAYER:
            yield f"model.layers.{i}.{_OURS_LAYER[rest]}", t
            return
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rpartition(".")[2]
            for p, part in zip(_QKV, _split_qkv(t, config)):
                yield f"model.layers.{i}.self_attn.{p}.{kind}", part
            return
    raise CheckpointError(f"tensor {name!r} has no LLaMA-layout name")


def to_llama_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """InternLM2 names (fused grouped wqkv) -> LLaMA names (q/k/v_proj). No rotary permutation."""
    return {n: t for name, w in sd.items() for n, t in _to_llama_items(name, w, config)}


def from_llama_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """LLaMA names -> InternLM2 names; names already in the InternLM2 layout pass through."""
    items = ((k, v, "<state dict>", k) for k, v in sd.items())
    return {n: t for n, t, _, _ in _to_internlm2_stream(items, config)}


# -- reading weights ---------------------------------------------------------------------------

def _resolve_weights(folder: Path) -> tuple[str, Path | None, dict[str, list[str] | None]]:
    """(format, index file or None, {file name: tensor names per the index, or None})."""
    for fmt, single, index in (("safetensors", SAFE_NAME, SAFE_INDEX), ("bin", BIN_NAME, BIN_INDEX)):
        ipath = folder / index
        if ipath.exists():
            data = _read_json(ipath)
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{ipath}: no 'weight_map' object of tensor name -> file")
            files: dict[str, list[str]] = {}
            for name, fname in wm.items():
                if Path(fname).name != fname:
                    raise CheckpointError(f"{ipath}: shard name {fname!r} is not a plain file name")
                files.setdefault(fname, []).append(name)
            for fname, names in files.items():
                if not (folder / fname).is_file():
                    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                    raise CheckpointError(
                        f"{ipath}: lists shard {fname!r} (tensor {names[0]!r}{more}) but "
                        f"{folder / fname} does not exist")
            return fmt, ipath, files
        if (folder / single).is_file():
            return fmt, None, {single: None}
    raise CheckpointError(f"{folder}: no weights found (expected {SAFE_NAME}, {SAFE_INDEX}, "
                          f"{BIN_NAME} or {BIN_INDEX})")


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, strictly with weights_only=True (no code runs from the file)."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{file}: refused: the file holds more than plain tensors and "
                              f"is only loaded with weights_only=True ({first})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


def _iter_file(folder: Path, fname: str, fmt: str, names: list[str] | None,
               index: Path | None) -> Iterator[_Item]:
    file = folder / fname
    if fmt == "bin":
        sd = _torch_load(file)
        for name in names if names is not None else list(sd):
            if name not in sd:
                raise CheckpointError(f"{file}: lacks tensor {name!r} that {index} places there")
            yield name, sd.pop(name), str(file), name
        return
    try:
        f = safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file, truncated or corrupt ({e})") from None
    with f:
        keys = set(f.keys())
        for name in names if names is not None else sorted(keys):
            if name not in keys:
                raise CheckpointError(f"{file}: lacks tensor {name!r} that {index} places there")
            try:
                t = f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
            yield name, t, str(file), name


def _iter_raw(folder: Path) -> Iterator[_Item]:
    fmt, index, files = _resolve_weights(folder)
    for fname, names in files.items():
        yield from _iter_file(folder, fname, fmt, names, index)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder under their stored names (safetensors preferred)."""
    folder = _folder(path)
    sd: dict[str, torch.Tensor] = {}
    for name, t, file, _ in _iter_raw(folder):
        if name in sd:
            raise CheckpointError(f"{file}: tensor {name!r} appears twice")
        sd[name] = t
    return sd


def _folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint folder" + ("" if p.exists() else " (does not exist)"))
    return p


_ARCHITECTURES = {"InternLM2ForRewardModel": InternLM2ForRewardModel}


def model_class(path: str | os.PathLike) -> type[InternLM2ForCausalLM]:
    """The module class a folder's config.json `architectures` asks for (causal LM by default;
    `InternLM2ForRewardModel` for reward models)."""
    file = Path(path) / CONFIG_NAME
    archs = _read_json(file).get("architectures") if file.is_file() else None
    for a in archs or ():
        if a in _ARCHITECTURES:
            return _ARCHITECTURES[a]
    return InternLM2ForCausalLM


def _expected_shapes(config: ModelConfig, cls: type = InternLM2ForCausalLM) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _checked_tensors(folder: Path, config: ModelConfig, cls: type = InternLM2ForCausalLM,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors under InternLM2 names, each checked against the config; then completeness."""
    expected = _expected_shapes(config, cls)
    seen: set[str] = set()
    for name, t, file, orig in _to_internlm2_stream(_iter_raw(folder), config):
        label = repr(orig) if orig == name else f"{orig!r} (as {name!r})"
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {label}; not part of an InternLM2 "
                                  f"model with this config.json")
        if name in seen:
            raise CheckpointError(f"{file}: tensor {label} appears twice")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{file}: tensor {label} has shape {list(t.shape)}, expected "
                                  f"{list(expected[name])} from {folder / CONFIG_NAME}")
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {label} has dtype {_dtype_name(t.dtype)}; "
                                  "expected a floating-point dtype (quantized checkpoints are "
                                  "not supported)")
        seen.add(name)
        yield name, t
    missing = [n for n in expected if n not in seen]
    if missing:
        _, index, files = _resolve_weights(folder)
        where = index if index is not None else folder / next(iter(files))
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(f"{where}: missing tensor(s) {shown} (config.json expects "
                              f"{len(expected)} tensors)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> InternLM2ForCausalLM:
    """Load an InternLM2- or LLaMA-layout folder into an InternLM2ForCausalLM (or, when its
    config.json says `InternLM2ForRewardModel`, into that)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    folder = _folder(path)
    config = load_config(folder)
    cls = model_class(folder)
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    for name, t in _checked_tensors(folder, config, cls):
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        module._parameters[attr] = nn.Parameter(t.to(device=device, dtype=dtype))
    model.config = config
    return model


# -- writing -------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
               "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """5_000_000, "500MB", "2GB", "1.5GiB" -> bytes (KB/MB/GB are powers of 10, as in HF)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"cannot read size {size!r}; use bytes or e.g. '500MB', '5GB'")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _ShardWriter:
    """Buffers tensors into shards of at most `max_bytes` (a bigger tensor gets its own)."""

    def __init__(self, folder: Path, max_bytes: int, dtype: torch.dtype | None):
        self.folder, self.max_bytes, self.dtype = folder, max_bytes, dtype
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []
        self.names: set[str] = set()
        self.total = 0
        self.dtypes: Counter[torch.dtype] = Counter()

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        t = t.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.to("cpu").contiguous()
        n = t.numel() * t.element_size()
        # safetensors refuses views and tensors sharing storage: give each its own.
        ptr = t.untyped_storage().data_ptr()
        if t.untyped_storage().nbytes() != n or any(
                b.untyped_storage().data_ptr() == ptr for b in self.buf.values()):
            t = t.clone()
        if self.buf and self.buf_bytes + n > self.max_bytes:
            self.flush()
        self.buf[name] = t
        self.buf_bytes += n
        self.total += n
        self.names.add(name)
        if t.is_floating_point():
            self.dtypes[t.dtype] += n

    def flush(self) -> None:
        if not self.buf:
            return
        fname = f".part-{len(self.parts) + 1:05d}.safetensors"
        save_file(self.buf, str(self.folder / fname), metadata={"format": "pt"})
        self.parts.append((fname, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def finish(self) -> list[str]:
        """Give the shards their final names; write the index when there are several."""
        self.flush()
        n = len(self.parts)
        if n == 0:
            raise ValueError("no tensors to save")
        final = [SAFE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for (tmp, _), name in zip(self.parts, final):
            os.replace(self.folder / tmp, self.folder / name)
        if n > 1:
            wm = {t: name for (_, names), name in zip(self.parts, final) for t in names}
            _write_json(self.folder / SAFE_INDEX, {"metadata": {"total_size": self.total},
                                                   "weight_map": dict(sorted(wm.items()))})
        return final

    @property
    def main_dtype(self) -> torch.dtype:
        return self.dtypes.most_common(1)[0][0] if self.dtypes else (self.dtype or torch.float32)


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_weight_or_config(name: str) -> bool:
    return (name in (CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_INDEX, BIN_INDEX)
            or name.endswith((".safetensors", ".bin")))


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "tokenization_")) or name in _AUX_FILES - {GENERATION_CONFIG_NAME}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def _atomic_folder(path: str | os.PathLike, keep_tokenizer: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`.

    Files of an existing folder that the new one does not produce (and that are not stale
    weights or configs) are carried over, so saving a model next to its tokenizer keeps it.
    On failure the temporary folder is removed and `path` is left untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            for entry in path.iterdir():
                if (tmp / entry.name).exists() or _is_weight_or_config(entry.name) or \
                        (not keep_tokenizer and _is_tokenizer_file(entry.name)):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(entry), str(tmp / entry.name))
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tokenizer_ids(tok: Any) -> dict[str, int]:
    def attr(*names: str) -> int | None:
        for n in names:
            v = getattr(tok, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
        return None

    ids = {k: attr(f"{k}_id", f"{k}_token_id") for k in ("bos", "eos", "pad")}
    im_end = attr("im_end_id")
    special = getattr(tok, "special_tokens", None)
    if im_end is None and isinstance(special, dict) and isinstance(special.get("<|im_end|>"), int):
        im_end = special["<|im_end|>"]
    if im_end is None:
        for meth in ("token_to_id", "convert_tokens_to_ids", "piece_to_id"):
            fn = getattr(tok, meth, None)
            if callable(fn):
                try:
                    v = fn("<|im_end|>")
                except Exception:
                    continue
                if isinstance(v, int) and v > 0 and v != ids.get("eos"):  # 0 = unk in SentencePiece
                    im_end = v
                    break
    ids["im_end"] = im_end
    return {k: v for k, v in ids.items() if v is not None}


def generation_config_dict(config: ModelConfig, tokenizer: Any = None,
                           overrides: Any = None) -> dict[str, Any]:
    """generation_config.json as released: eos = [eos, <|im_end|>], sampling 0.8 / 0.8.

    Without a tokenizer the official `<|im_end|>` id (92542) is used when the vocabulary has it.
    `overrides`: a dict, or an object with `to_dict()` / dataclass fields, merged on top.
    """
    ids = _tokenizer_ids(tokenizer) if tokenizer is not None else {}
    eos = ids.get("eos", config.eos_token_id)
    im_end = ids.get("im_end", IM_END_ID if tokenizer is None and config.vocab_size > IM_END_ID else None)
    d: dict[str, Any] = {
        "bos_token_id": ids.get("bos", config.bos_token_id),
        "eos_token_id": [eos] + ([im_end] if im_end is not None and im_end != eos else []),
        "pad_token_id": ids.get("pad", config.pad_token_id),
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.8,
        "max_new_tokens": 1024,
    }
    if overrides is not None:
        if not isinstance(overrides, dict):
            import dataclasses
            if hasattr(overrides, "to_dict"):
                overrides = overrides.to_dict()
            elif dataclasses.is_dataclass(overrides):
                overrides = dataclasses.asdict(overrides)
            else:
                raise TypeError(f"generation_config must be a dict or dataclass, got {type(overrides).__name__}")
        d.update({k: v for k, v in overrides.items() if v is not None})
    return d


def save_model(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
               max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
               generation_config: Any = None) -> Path:
    """Write a Hugging Face folder like the released checkpoints, atomically. Returns `path`."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    config: ModelConfig = model.config
    path = Path(path)
    with _atomic_folder(path, keep_tokenizer=tokenizer is None) as tmp:
        writer = _ShardWriter(tmp, max_bytes, dtype)
        for name, t in model.state_dict().items():
            writer.add(name, t)
        writer.finish()
        cfg = config.to_hf_dict()
        arch = getattr(model, "hf_architecture", None)
        if arch:  # e.g. a reward model: its own class in architectures and auto_map
            cfg["architectures"] = [arch]
            cfg["auto_map"] = {"AutoConfig": cfg["auto_map"]["AutoConfig"],
                               "AutoModel": f"modeling_internlm2.{arch}"}
        cfg["torch_dtype"] = _dtype_name(writer.main_dtype)
        _write_json(tmp / CONFIG_NAME, cfg)
        _write_json(tmp / GENERATION_CONFIG_NAME,
                    generation_config_dict(config, tokenizer, generation_config))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str = "llama",
                       max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Rewrite a folder in the LLaMA (`to="llama"`) or InternLM2 layout, streaming by shard.

    The source may be either layout; every tensor is checked against its config.json.
    Tokenizer files and generation_config.json are copied across.
    """
    if to not in ("llama", "internlm2"):
        raise ValueError(f"to must be 'llama' or 'internlm2', got {to!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    src = _folder(src)
    config = load_config(src)
    max_bytes = parse_size(max_shard_size)
    with _atomic_folder(dst, keep_tokenizer=False) as tmp:
        writer = _ShardWriter(tmp, max_bytes, dtype)
        for name, t in _checked_tensors(src, config):
            if to == "llama":
                for n2, t2 in _to_llama_items(name, t, config):
                    writer.add(n2, t2)
            else:
                writer.add(name, t)
        writer.finish()
        cfg = llama_config_dict(config) if to == "llama" else config.to_hf_dict()
        cfg["torch_dtype"] = _dtype_name(writer.main_dtype)
        _write_json(tmp / CONFIG_NAME, cfg)
        for entry in src.iterdir():
            name = entry.name
            if entry.is_file() and (name == GENERATION_CONFIG_NAME or _is_tokenizer_file(name)
                                    or (to == "internlm2" and name in _REMOTE_CODE)):
                shutil.copy2(entry, tmp / name)
    return Path(dst)


# -- inspection ------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} from the header alone; checks the file covers its data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{file}: not a valid safetensors file (bad header size)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: not a valid safetensors file (unreadable header)") from None
    out = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = (_ST_DTYPES.get(info["dtype"], info["dtype"].lower()), list(info["shape"]))
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated ({size} bytes, the header needs {8 + n + end})")
    return out


def model_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint folder holds, read from headers (safetensors) without loading weights."""
    folder = _folder(path)
    config = load_config(folder)
    fmt, index, files = _resolve_weights(folder)
    tensors: dict[str, tuple[str, list[int]]] = {}
    for fname in files:
        if fmt == "safetensors":
            tensors.update(_safetensors_header(folder / fname))
        else:
            tensors.update({k: (_dtype_name(v.dtype), list(v.shape))
                            for k, v in _torch_load(folder / fname).items()})
    numel = {k: int(torch.Size(s).numel()) for k, (_, s) in tensors.items()}
    by_dtype: Counter[str] = Counter()
    for k, (dt, _) in tensors.items():
        by_dtype[dt] += numel[k]
    llama = any(k in _LLAMA_TOP and k != "model.norm.weight" or ".self_attn." in k for k in tensors)
    names = ([f.name for f in (index,) if f is not None] + list(files))
    return {
        "path": str(folder),
        "layout": "llama" if llama else "internlm2",
        "format": fmt,
        "num_params": sum(v for k, v in numel.items() if not k.endswith("rotary_emb.inv_freq")),
        "num_params_config": config.num_params(),
        "num_tensors": len(tensors),
        "dtype": by_dtype.most_common(1)[0][0] if by_dtype else None,
        "dtypes": dict(by_dtype),
        "files": [{"name": n, "bytes": (folder / n).stat().st_size} for n in names],
        "total_bytes": sum((folder / n).stat().st_size for n in names),
        "config": {**{k: v for k, v in vars(config).items() if k != "extra"},
                   "head_dim": config.head_dim, "q_per_kv": config.q_per_kv},
    }


# -- command line --------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cli_convert(args: argparse.Namespace) -> int:
    dtype = _DTYPES[args.dtype] if args.dtype else None
    dst = convert_checkpoint(args.src, args.dst, to=args.to, max_shard_size=args.max_shard_size,
                             dtype=dtype)
    info = model_info(dst)
    print(f"wrote {dst} ({args.to} layout, {info['num_params']:,} parameters, {info['dtype']}, "
          f"{len(info['files'])} file(s))")
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"path        {info['path']}")
    print(f"layout      {info['layout']} ({info['format']})")
    print(f"parameters  {info['num_params']:,} (config says {info['num_params_config']:,})")
    print(f"dtype       {info['dtype']}  " + ", ".join(f"{k}: {v:,}" for k, v in info["dtypes"].items()))
    print(f"size        {info['total_bytes'] / 1e9:.3f} GB in {len(info['files'])} file(s)")
    print(f"model       hidden {c['hidden_size']}, layers {c['num_hidden_layers']}, heads "
          f"{c['num_attention_heads']} (kv {c['num_key_value_heads']}, head_dim {c['head_dim']}), "
          f"ffn {c['intermediate_size']}, vocab {c['vocab_size']}")
    print(f"rope        theta {c['rope_theta']:g}, scaling {c['rope_scaling']}, "
          f"max_position_embeddings {c['max_position_embeddings']}")
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint folder between the InternLM2 and LLaMA layouts",
        description="Rewrite a Hugging Face checkpoint folder in the LLaMA layout (for "
                    "transformers' LlamaForCausalLM, vLLM, llama.cpp) or back in the InternLM2 layout.")
    p.add_argument("src", help="source checkpoint folder (either layout)")
    p.add_argument("dst", help="destination folder (replaced atomically)")
    p.add_argument("--to", choices=["llama", "internlm2"], required=True, help="target layout")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="cast the weights (default: keep the stored dtype)")
    p.set_defaults(func=_cli_convert)

    q = subparsers.add_parser("info", help="describe a checkpoint folder (parameters, dtype, files)")
    q.add_argument("--model", required=True, help="checkpoint folder")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cli_info)


__all__ = ["CheckpointError", "load_config", "load_state_dict", "load_model", "save_model",
           "convert_checkpoint", "to_llama_state_dict", "from_llama_state_dict",
           "llama_config_dict", "generation_config_dict", "model_info", "parse_size", "add_cli"]
