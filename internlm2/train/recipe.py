"""Pretraining recipes: a TOML file plus command-line overrides -> one small dataclass per concern.

A recipe file has the tables below (every key optional; the defaults are the report's numbers,
REFERENCE.md section 5). Overrides address any key with dots, list items by index:
`--optimizer.lr 1e-3`, `--set phases.1.seq_len=8192`, `--model.hidden_size 128`. Values are
read as TOML literals (`1e-3`, `true`, `[1, 2]`, `{a = 1}`), else taken as plain strings.

    [model]       preset = "7b"; init_from = "" (an HF folder to continue from);
                  any ModelConfig field (hidden_size = 128, vocab_size = 1024, ...)
    [data]        sources = {name = "shard folder" | "builtin:code|prose_en|synthetic"};
                  mixture = {name = token share} ({} = in proportion to size); tokenizer;
                  dir (cache of the built-in corpus, default OUT/data); builtin_code_files;
                  builtin_synthetic_docs; val_fraction; long_min_tokens
    [[phases]]    name, fraction (of the steps, or of train.tokens), seq_len, rope_theta,
                  long_share (token share of documents >= data.long_min_tokens; unset =
                  natural), lr_scale, batch_tokens (0 = train's), micro_batch_size (0 =
                  train's), mixture ({} = data's)
    [optimizer]   AdamW lr, beta1, beta2, eps, weight_decay, decay_embeddings, decay_norms,
                  grad_clip
    [schedule]    warmup_steps (or warmup_fraction), decay = cosine|linear|constant,
                  min_lr_ratio
    [train]       steps (or tokens), stop_at, batch_tokens (global, per optimizer step),
                  micro_batch_size (samples per rank per forward), seed, dtype, eval_every,
                  eval_tokens, log_every, peak_tflops (per device; 0 = measured),
                  deterministic, progress
    [checkpoint]  every, keep, async_save, hf, hf_dtype
    [parallel]    dp_replicate, dp_shard (-1 = the rest of the world), tp, cp, ac_ratio,
                  compile
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig


class RecipeError(ValueError):
    """A recipe key or value that cannot be used."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    init_from: str = ""  # a Hugging Face folder to continue pretraining from
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields

    def build_config(self) -> ModelConfig:
        if self.init_from:
            from ..hf import load_config
            cfg = load_config(self.init_from)
            return cfg.replace(**self.overrides) if self.overrides else cfg
        return ModelConfig.preset(self.preset, **self.overrides)


@dataclass
class DataSection:
    sources: dict[str, str] = field(default_factory=lambda: {
        "code": "builtin:code", "prose": "builtin:prose_en", "synthetic": "builtin:synthetic"})
    mixture: dict[str, float] = field(default_factory=dict)
    tokenizer: str = ""  # "" = the tokenizer trained for the built-in corpus (under dir)
    dir: str = ""  # where the built-in corpus is prepared and cached ("" = OUT/data)
    builtin_code_files: int = 0  # standard-library files in the built-in corpus (0 = all)
    builtin_synthetic_docs: int = 12000
    builtin_retrieval_docs: int = 0  # needle-in-a-haystack documents ("builtin:retrieval")
    val_fraction: float = 0.02  # for shards written from the built-in corpus
    long_min_tokens: int = 0  # "long" documents for phases' long_share (0 = phase 1 seq_len)


@dataclass
class PhaseSection:
    name: str = ""
    fraction: float = 1.0
    seq_len: int = 4096
    rope_theta: float = 50_000.0
    long_share: float | None = None
    lr_scale: float = 1.0
    batch_tokens: int = 0
    micro_batch_size: int = 0
    mixture: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # tok_embeddings and output (the report leaves them out)
    decay_norms: bool = False
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    warmup_steps: int = 2000
    warmup_fraction: float = 0.0  # > 0: warmup = this share of the steps (wins over steps)
    decay: str = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class TrainSection:
    steps: int = 1000
    tokens: int = 0  # > 0: the run length in tokens (phases' steps from their batch_tokens)
    stop_at: int = 0  # > 0: stop (with a checkpoint) after this step; the schedule is unchanged
    batch_tokens: int = 4 * 1024 * 1024
    micro_batch_size: int = 1
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype; master weights and optimizer are fp32
    eval_every: int = 0  # 0: at the end only
    eval_tokens: int = 1 << 20
    log_every: int = 1
    peak_tflops: float = 0.0  # per device; 0 = measure with a GEMM benchmark (cached)
    deterministic: bool = False
    progress: bool = True


@dataclass
class CheckpointSection:
    every: int = 1000
    keep: int = 3
    async_save: bool = False
    hf: bool = True  # a Hugging Face model folder in every checkpoint
    hf_dtype: str = ""  # its weights' dtype: "" = as trained (fp32), "bfloat16", "float32"


@dataclass
class ParallelSection:
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    cp: int = 1
    ac_ratio: float = 0.0
    compile: bool = False


@dataclass
class PhasePlan:
    """A phase placed on the step axis: steps [start, end) (0-based optimizer steps)."""
    index: int
    start: int
    end: int
    phase: PhaseSection
    batch_tokens: int
    micro_batch_size: int

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def steps(self) -> int:
        return self.end - self.start


_SECTIONS = {"model": ModelSection, "data": DataSection, "optimizer": OptimizerSection,
             "schedule": ScheduleSection, "train": TrainSection,
             "checkpoint": CheckpointSection, "parallel": ParallelSection}


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    phases: list[PhaseSection] = field(default_factory=lambda: [PhaseSection()])
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "Recipe":
        """Read a TOML recipe (None: the defaults) and apply `key=value` overrides."""
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"recipe not found: {p}")
            try:
                raw = tomllib.loads(p.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise RecipeError(f"{p}: {e}") from None
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise RecipeError(f"override {item!r}: expected KEY=VALUE")
            set_dotted(raw, key.strip(), parse_value(value))
        try:
            return cls.from_dict(raw)
        except RecipeError as e:
            raise RecipeError(f"{path or 'recipe'}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Recipe":
        raw = copy.deepcopy(raw)
        unknown = set(raw) - set(_SECTIONS) - {"phases"}
        if unknown:
            raise RecipeError(f"unknown table(s) {sorted(unknown)}; expected "
                              f"{sorted([*_SECTIONS, 'phases'])}")
        kw: dict[str, Any] = {}
        for name, kind in _SECTIONS.items():
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise RecipeError(f"[{name}] must be a table")
            if name == "model":
                table = _model_table(table)
            kw[name] = _build(kind, table, name)
        phases = raw.get("phases", [{}])
        if isinstance(phases, dict):  # overrides of `phases.0.x` on a recipe without phases
            phases = [phases[k] for k in sorted(phases, key=int)]
        if not isinstance(phases, list) or not phases:
            raise RecipeError("[[phases]] must be a non-empty array of tables")
        kw["phases"] = [_build(PhaseSection, p, f"phases.{i}") for i, p in enumerate(phases)]
        recipe = cls(**kw)
        recipe.validate()
        return recipe

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, "init_from": self.model.init_from,
                      **self.model.overrides}
        for p in d["phases"]:
            if p["long_share"] is None:
                del p["long_share"]
        return d

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        t, o, s = self.train, self.optimizer, self.schedule
        if t.steps < 1 and t.tokens <= 0:
            raise RecipeError("train.steps must be >= 1 (or set train.tokens)")
        if t.stop_at < 0:
            raise RecipeError("train.stop_at must be >= 0 (0: run to the end)")
        for name in ("batch_tokens", "micro_batch_size", "eval_tokens", "log_every"):
            if getattr(t, name) < 1:
                raise RecipeError(f"train.{name} must be >= 1")
        if t.dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"train.dtype {t.dtype!r}: use float32 or bfloat16")
        if self.checkpoint.hf_dtype not in ("", "float32", "bfloat16"):
            raise RecipeError(f"checkpoint.hf_dtype {self.checkpoint.hf_dtype!r}: use \"\", "
                              "float32 or bfloat16")
        if o.lr <= 0 or not 0 <= o.beta1 < 1 or not 0 <= o.beta2 < 1 or o.eps <= 0:
            raise RecipeError("optimizer: lr and eps must be > 0, betas in [0, 1)")
        if o.weight_decay < 0 or o.grad_clip < 0:
            raise RecipeError("optimizer: weight_decay and grad_clip must be >= 0 (0 = off)")
        if s.decay not in ("cosine", "linear", "constant"):
            raise RecipeError(f"schedule.decay {s.decay!r}: use cosine, linear or constant")
        if not 0 <= s.min_lr_ratio <= 1 or s.warmup_steps < 0 or not 0 <= s.warmup_fraction < 1:
            raise RecipeError("schedule: min_lr_ratio in [0, 1], warmup_steps >= 0, "
                              "warmup_fraction in [0, 1)")
        if self.checkpoint.keep < 1 or self.checkpoint.every < 0:
            raise RecipeError("checkpoint.keep must be >= 1 and checkpoint.every >= 0 (0 = end only)")
        names = set(self.data.sources)
        if not names:
            raise RecipeError("data.sources is empty")
        for where, mix in [("data.mixture", self.data.mixture)] + [
                (f"phases.{i}.mixture", p.mixture) for i, p in enumerate(self.phases)]:
            bad = set(mix) - names
            if bad:
                raise RecipeError(f"{where} names unknown source(s) {sorted(bad)}; "
                                  f"data.sources has {sorted(names)}")
            if any(w < 0 for w in mix.values()) or (mix and sum(mix.values()) <= 0):
                raise RecipeError(f"{where}: weights must be >= 0 with a positive sum")
        for i, p in enumerate(self.phases):
            if p.fraction <= 0 or p.seq_len < 2 or p.rope_theta <= 0 or p.lr_scale < 0:
                raise RecipeError(f"phases.{i}: fraction > 0, seq_len >= 2, rope_theta > 0 "
                                  "and lr_scale >= 0 are required")
            if p.long_share is not None and not 0 <= p.long_share <= 1:
                raise RecipeError(f"phases.{i}.long_share must be in [0, 1]")
        self.model.build_config()  # model overrides checked by ModelConfig

    # -- derived -------------------------------------------------------------------------
    def phase_plan(self) -> list[PhasePlan]:
        """Phases on the step axis. Fractions are normalised to sum to 1; with train.tokens
        a phase's steps are its share of the tokens over its batch_tokens."""
        total_f = sum(p.fraction for p in self.phases)
        plans, start, cum = [], 0, 0.0
        for i, p in enumerate(self.phases):
            bt = p.batch_tokens or self.train.batch_tokens
            mb = p.micro_batch_size or self.train.micro_batch_size
            cum += p.fraction / total_f
            if self.train.tokens > 0:
                n = max(1, round(p.fraction / total_f * self.train.tokens / bt))
                end = start + n
            else:
                end = self.train.steps if i == len(self.phases) - 1 else \
                    max(start, round(cum * self.train.steps))
            plans.append(PhasePlan(i, start, end, p, bt, mb))
            start = end
        return plans

    @property
    def total_steps(self) -> int:
        return self.phase_plan()[-1].end

    @property
    def warmup_steps(self) -> int:
        s = self.schedule
        if s.warmup_fraction > 0:
            return int(round(s.warmup_fraction * self.total_steps))
        return s.warmup_steps


# -- helpers ---------------------------------------------------------------------------------

def _model_table(table: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    out = {k: table[k] for k in ("preset", "init_from") if k in table}
    over = dict(table.get("overrides", {}))
    for k, v in table.items():
        if k in ("preset", "init_from", "overrides"):
            continue
        if k not in fields:
            raise RecipeError(f"[model] has unknown key {k!r}; expected preset, init_from or a "
                              f"ModelConfig field ({', '.join(sorted(fields))})")
        over[k] = v
    out["overrides"] = over
    return out


def _build(kind: type, table: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(table) - set(fields)
    if unknown:
        raise RecipeError(f"[{where}] has unknown key(s) {sorted(unknown)}; expected "
                          f"{sorted(fields)}")
    kw = {}
    for k, v in table.items():
        default = fields[k].default
        if default is dataclasses.MISSING:
            default = fields[k].default_factory()  # type: ignore[misc]
        kw[k] = _coerce(v, default, f"{where}.{k}")
    return kind(**kw)


def _coerce(v: Any, default: Any, where: str) -> Any:
    """Check a value against the type of its default (ints widen to floats)."""
    if default is None:  # optional float (long_share)
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            return None if v is None else float(v)
        raise RecipeError(f"{where} must be a number, got {v!r}")
    if isinstance(default, bool):
        if isinstance(v, bool):
            return v
    elif isinstance(default, int):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif isinstance(default, float):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    elif isinstance(default, str):
        if isinstance(v, str):
            return v
    elif isinstance(default, dict):
        if isinstance(v, dict):
            return dict(v)
    else:
        return v
    raise RecipeError(f"{where} must be {type(default).__name__}, got {v!r}")


def parse_value(text: str) -> Any:
    """A TOML literal (`3e-4`, `true`, `"x"`, `[1, 2]`, `{a = 1}`), else the plain string."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """d["a"]["b"] = value for key "a.b"; list items by index ("phases.1.seq_len")."""
    parts = key.split(".")
    cur: Any = d
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise RecipeError(f"override {key!r}: {part!r} is not an index of a list of "
                                  f"{len(cur)}")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
            continue
        if not isinstance(cur, dict):
            raise RecipeError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a table")
        if last:
            cur[part] = value
        else:
            if part == "phases" and part not in cur:
                cur[part] = [{}]
            cur = cur.setdefault(part, {})


__all__ = ["Recipe", "RecipeError", "ModelSection", "DataSection", "PhaseSection",
           "OptimizerSection", "ScheduleSection", "TrainSection", "CheckpointSection",
           "ParallelSection", "PhasePlan", "parse_value", "set_dotted"]
