"""LoRA adapters (Hu et al. 2021) for InternLM2, in the layout PEFT and XTuner use.

`apply_lora` wraps the targeted `nn.Linear` layers (by module-name suffix, default the
attention and FFN projections) in `LoRALinear`: y = W x + (B A dropout(x)) * alpha / r, with
A kaiming-uniform and B zero so a fresh adapter leaves the model unchanged, and freezes
everything else. An adapter folder holds PEFT's `adapter_config.json` and
`adapter_model.safetensors` with PEFT's tensor names
(`base_model.model.model.layers.0.attention.wqkv.lora_A.weight`), so it also loads with
`peft.PeftModel.from_pretrained` on the official remote-code model, whose module names are ours.
`merge_lora` folds the adapters into plain Linears (W + alpha/r * B @ A, computed in fp32), and
`merge_adapter_folder` / `internlm2 lora merge` write a normal Hugging Face folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?(?:\.weight)?$")
# PEFT options that change the math; we implement only their defaults.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                "bias": "none", "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    # Module-name suffixes ("wqkv" or "attention.wqkv"), or one regex matched against the
    # whole name (PEFT's meaning of a string `target_modules`).
    targets: tuple[str, ...] | str = ("wqkv", "wo", "w1", "w2", "w3")

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        t = self.targets
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "targets": t if isinstance(t, str) else list(t)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Our keys, or a PEFT adapter_config.json (lora_alpha, lora_dropout, target_modules)."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type {d['peft_type']!r} is not LoRA")
        for k, default in _UNSUPPORTED.items():
            if d.get(k) not in (default, None):
                raise ValueError(f"{k}={d[k]!r} is not supported (only {k}={default!r})")
        if d.get("layers_to_transform") is not None or d.get("lora_bias"):
            raise ValueError("layers_to_transform and lora_bias are not supported")
        kw = {"r": d.get("r", 8), "alpha": d.get("alpha", d.get("lora_alpha", 16)),
              "dropout": d.get("dropout", d.get("lora_dropout", 0.0))}
        targets = d.get("targets", d.get("target_modules"))
        if targets is not None:
            kw["targets"] = targets
        return cls(**kw)

    def to_peft_dict(self, base_model: str | None = None) -> dict[str, Any]:
        t = self.targets
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": t if isinstance(t, str) else list(t),
                "inference_mode": True, "init_lora_weights": True, **_UNSUPPORTED}


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`.base`) plus a trainable low-rank update B @ A.

    LoRA weights default to fp32 when the base is fp16/bf16 (PEFT's autocast_adapter_dtype):
    the input is cast to their dtype for the update and the sum cast back to the base output's.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        if dtype is None:
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=w.device, dtype=dtype))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        nn.init.zeros_(self.lora_B)

    # Code that reads `.weight` of a projection (dtype, device) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x).to(self.lora_A.dtype)
        delta = (h @ self.lora_A.t()) @ self.lora_B.t()
        return y + (delta * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain Linear with weight W + scaling * B @ A (in W's dtype, computed in fp32)."""
        w = self.base.weight
        merged = w.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        with torch.device("meta"):
            out = nn.Linear(self.base.in_features, self.base.out_features,
                            bias=self.base.bias is not None)
        out.weight = nn.Parameter(merged.to(w.dtype), requires_grad=w.requires_grad)
        out.bias = self.base.bias
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and _matches(n, config.targets)]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of a model."""
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def apply_lora(model: nn.Module, config: LoRAConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every targeted nn.Linear in a LoRALinear in place and freeze all other
    parameters. Returns the wrapped module names. Apply after the weights are materialised."""
    model = _unwrap(model)
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers (merge_lora first, or load into it)")
    found = _targets(model, config)
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"LoRA targets {config.targets!r} match no nn.Linear module; linear "
                         f"modules are e.g. {linears[:6]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in found:
        _replace(model, name, LoRALinear(lin, config.r, config.alpha, config.dropout, dtype))
    return [n for n, _ in found]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors: {"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in lora_layers(model).items()
            for k in ("lora_A", "lora_B")}


def trainable_summary(model: nn.Module) -> str:
    """"trainable 0.52M / 7.10M (7.3%)"."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    t = sum(p.numel() for p in params if p.requires_grad)

    def fmt(x: int) -> str:
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x / 1e3:.2f}K"

    pct = 100.0 * t / max(n, 1)
    return f"trainable {fmt(t)} / {fmt(n)} ({pct:.1f}%)" if pct >= 1 or t == 0 else \
        f"trainable {fmt(t)} / {fmt(n)} ({pct:.2g}%)"


def save_adapter(model: nn.Module, config: LoRAConfig, path: str | os.PathLike,
                 base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT names), atomically."""
    sd = lora_state_dict(model)
    if not sd:
        raise ValueError("the model has no LoRA layers to save")
    tensors = {f"{_PEFT_PREFIX}{k}.weight": t.to("cpu").contiguous().clone() for k, t in sd.items()}
    with hf._atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(config.to_peft_dict(base_model), indent=2) + "\n", encoding="utf-8")
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config (is {path} a LoRA adapter folder?)")
    try:
        return LoRAConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def _read_adapter_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], list[str], Path]:
    """({"<module>.lora_A": tensor}, keys that are not LoRA A/B, file)."""
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (is {folder} a LoRA adapter folder?)")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            names = f.keys()
            raw = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a valid safetensors file ({e})") from None
    found = {k: _KEY_RE.match(k) for k in raw}
    out = {f"{m[1]}.{m[2]}": raw[k] for k, m in found.items() if m}
    return out, [k for k, m in found.items() if not m], file


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_adapter(model: nn.Module, path: str | os.PathLike,
                 dtype: torch.dtype | None = None) -> LoRAConfig:
    """Load an adapter folder into `model`: apply_lora with its config (unless the model
    already has LoRA layers), then copy the tensors. Everything is checked before the model
    is touched. Returns the adapter's config."""
    model = _unwrap(model)
    config = read_adapter_config(path)
    tensors, other, file = _read_adapter_tensors(Path(path))
    layers = lora_layers(model)
    if layers:
        shapes = {f"{n}.{k}": tuple(getattr(m, k).shape) for n, m in layers.items()
                  for k in ("lora_A", "lora_B")}
    else:
        shapes = {}
        for n, lin in _targets(model, config):
            shapes[f"{n}.lora_A"] = (config.r, lin.in_features)
            shapes[f"{n}.lora_B"] = (lin.out_features, config.r)
    if not shapes:
        raise ValueError(f"{file}: adapter targets {config.targets!r} match no nn.Linear "
                         "module of the model")
    missing = [k for k in shapes if k not in tensors]
    unexpected = other + [k for k in tensors if k not in shapes]
    wrong = [f"{k} {list(t.shape)} (model {list(shapes[k])})" for k, t in tensors.items()
             if k in shapes and tuple(t.shape) != shapes[k]]
    problems = [f"{what} {_listed(xs)}" for what, xs in (
        ("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
        ("shape mismatch", wrong)) if xs]
    if problems:
        raise ValueError(f"{file}: adapter (r={config.r}) does not fit the model: "
                         + "; ".join(problems))
    if not layers:
        apply_lora(model, config, dtype)
        layers = lora_layers(model)
    with torch.no_grad():
        for n, m in layers.items():
            m.lora_A.copy_(tensors[f"{n}.lora_A"])
            m.lora_B.copy_(tensors[f"{n}.lora_B"])
            m.alpha, m.scaling = config.alpha, config.scaling
            m.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by its merged nn.Linear in place; the state dict then has the
    plain model's names. requires_grad flags stay as apply_lora left them."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    for name, m in layers.items():
        _replace(_unwrap(model), name, m.merge())
    return model


def merge_adapter_folder(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                         out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Base HF folder + adapter folder -> merged HF folder (atomically). dtype None keeps the
    base's stored dtype; the merge itself is computed in fp32 either way."""
    base = Path(base_dir)
    if dtype is None:
        stored = hf.model_info(base)["dtype"]
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)
    read_adapter_config(adapter_dir)  # fail on a bad adapter before loading the base
    model = hf.load_model(base, dtype=dtype)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    # The base's tokenizer and remote-code files travel as in hf.convert_checkpoint: a stand-in
    # tokenizer whose save() copies them into save_model's temporary folder.
    carried = [f for f in sorted(base.iterdir()) if f.is_file() and (
        hf._is_tokenizer_file(f.name) or f.name in hf._REMOTE_CODE)]

    def copy_to(directory: str | os.PathLike) -> None:
        for f in carried:
            shutil.copy2(f, Path(directory) / f.name)

    gen_file = base / hf.GENERATION_CONFIG_NAME
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
    return hf.save_model(model, out_dir, tokenizer=SimpleNamespace(save=copy_to),
                         generation_config=gen)


# -- command line --------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cli_merge(args: argparse.Namespace) -> int:
    dtype = _DTYPES[args.dtype] if args.dtype else None
    out = merge_adapter_folder(args.base, args.adapter, args.out, dtype=dtype)
    info = hf.model_info(out)
    print(f"wrote {out} (merged {args.adapter} into {args.base}; {info['num_params']:,} "
          f"parameters, {info['dtype']})")
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("lora", help="LoRA adapters: merge into a base model")
    sub = p.add_subparsers(dest="lora_command", metavar="LORA_COMMAND")
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model, writing a plain "
                       "Hugging Face folder (tokenizer files carried over)")
    m.add_argument("--base", required=True, help="base model folder (Hugging Face format)")
    m.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    m.add_argument("--out", required=True, help="output folder (replaced atomically)")
    m.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="dtype of the merged weights (default: the base's)")
    m.set_defaults(func=_cli_merge)


__all__ = ["LoRAConfig", "LoRALinear", "add_cli", "apply_lora", "load_adapter", "lora_layers",
           "lora_state_dict", "merge_adapter_folder", "merge_lora", "read_adapter_config",
           "save_adapter", "trainable_summary"]
