"""Model configuration: the fields of the official InternLM2 `config.json`, and presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Keys that official config.json files carry but that do not change the model.
_IGNORED_HF_KEYS = {
    "auto_map", "architectures", "model_type", "attn_implementation", "pretraining_tp",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "_name_or_path",
    "hidden_act", "tie_word_embeddings", "bias", "rope_scaling", "output_attentions",
    "output_hidden_states", "return_dict",
}

AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


class ConfigError(ValueError):
    """A config field has a value the model cannot use."""


@dataclass
class ModelConfig:
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    # None, or {"type": "linear" | "dynamic", "factor": float} as in the official config.json.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    # Extra keys of a loaded config.json we do not interpret; written back on save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self, embeddings: bool = True) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * d * h
        wo = h * self.num_attention_heads * d
        bias = ((self.num_attention_heads + 2 * self.num_key_value_heads) * d + h) if self.bias else 0
        per_layer = qkv + wo + bias + 3 * h * i + 2 * h
        n = self.num_hidden_layers * per_layer + h
        if embeddings:
            n += 2 * self.vocab_size * h
        return n

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta or self.rope_theta <= 0:
            raise ConfigError(f"config field 'rope_theta' must be positive, got {self.rope_theta!r}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        key = name.lower().replace("-", "_").replace(".", "_")
        key = {"1_8b": "1_8b", "1p8b": "1_8b", "1_8": "1_8b"}.get(key, key)
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    # -- Hugging Face config.json --------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = _from_llama_keys(dict(d), source)
        mt = d.get("model_type", "internlm2")
        if mt not in ("internlm2", "internlm2_5", "llama"):
            raise ConfigError(f"{source}: model_type {mt!r} is not an InternLM2 model")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (InternLM2 uses silu)")
        if d.get("tie_word_embeddings", False):
            raise ConfigError(f"{source}: tie_word_embeddings=true is not an InternLM2 layout")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in names if k in d and k != "rope_scaling"}
        if "num_key_value_heads" not in d and "num_attention_heads" in d:
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(k), list):
                kwargs[k] = kwargs[k][0]
            if kwargs.get(k) is None:
                kwargs.pop(k, None)
        if "rope_theta" in kwargs:
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        try:
            kwargs["rope_scaling"] = normalize_rope_scaling(d.get("rope_scaling"))
            extra = {k: v for k, v in d.items() if k not in names and k not in _IGNORED_HF_KEYS}
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["InternLM2ForCausalLM"],
            "auto_map": dict(AUTO_MAP),
            "model_type": "internlm2",
            "attn_implementation": "eager",
            "bias": self.bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        d.update(self.extra)
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# LLaMA-layout config keys with no ModelConfig field (read or checked by `_from_llama_keys`).
_LLAMA_ONLY_KEYS = {"attention_bias", "attention_dropout", "mlp_bias", "head_dim", "rope_parameters"}


def _from_llama_keys(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Fold LLaMA / transformers-5 config keys into the InternLM2 ones (in place)."""
    rp = d.get("rope_parameters")  # transformers >= 5 keeps theta and scaling together here
    if isinstance(rp, dict) and ("rope_type" in rp or "type" in rp or "rope_theta" in rp):
        if "rope_theta" in rp:
            d.setdefault("rope_theta", rp["rope_theta"])
        if d.get("rope_scaling") is None:
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    elif rp is not None:
        raise ConfigError(f"{source}: rope_parameters {rp!r} is not supported (per-layer rope)")
    hd = d.get("head_dim")
    if hd is not None and "hidden_size" in d and "num_attention_heads" in d and \
            hd * d["num_attention_heads"] != d["hidden_size"]:
        raise ConfigError(f"{source}: head_dim {hd} != hidden_size / num_attention_heads; "
                          "InternLM2 needs head_dim * num_attention_heads == hidden_size")
    if d.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not an InternLM2 layout")
    if "attention_bias" in d and "bias" not in d:
        d["bias"] = bool(d["attention_bias"])
    for k in _LLAMA_ONLY_KEYS:
        d.pop(k, None)
    return d


def normalize_rope_scaling(rs: Any) -> dict[str, Any] | None:
    """Check a `rope_scaling` value; return `None` or `{"type": ..., "factor": float}`."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling must be null or an object, got {rs!r}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "dynamic"):
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; InternLM2 uses 'linear' or 'dynamic'")
    factor = rs.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
    return {"type": kind, "factor": float(factor)}


_OFFICIAL = dict(vocab_size=92544, max_position_embeddings=32768, rope_theta=1_000_000.0)

PRESETS: dict[str, dict[str, Any]] = {
    # A few M parameters: tests and CPU runs. Vocabulary sized for a project-trained tokenizer.
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0),
    # About 100M parameters (head_dim 128 like the released sizes): benchmarks on CPU.
    "100m": dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0),
    "1_8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, **_OFFICIAL),
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, **_OFFICIAL),
    "20b": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                num_attention_heads=48, num_key_value_heads=8, **_OFFICIAL),
}
