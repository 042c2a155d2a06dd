"""`internlm2.pipeline(model_dir)`: batched offline inference in three lines (LMDeploy-like).

    with internlm2.pipeline("runs/x/sft") as pipe:
        print(pipe("Hi, who are you?").text)
        for r in pipe(["one", "two"], gen_config={"max_new_tokens": 32}): ...
        for delta in pipe.stream([{"role": "user", "content": "Hi"}]): print(delta.text, end="")

A prompt is text (completed as is, with <s> first) or a list of chat messages (the chat
template is applied, generation starts as the assistant). All prompts of a call share one
continuous-batching Engine, so a batch is decoded together with prefix caching.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["pipeline", "Pipeline", "Response"]


@dataclass
class Response:
    """One answer. From `stream()`, `text` / `token_ids` are the delta of that step."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    generate_token_len: int
    index: int = 0
    logprobs: list | None = None


# LMDeploy GenerationConfig / internlm2.generate.GenerationConfig names -> SamplingParams names
_ALIASES = {"max_new_tokens": "max_tokens", "random_seed": "seed", "stop_words": "stop",
            "stop_strings": "stop", "stop_ids": "stop_token_ids"}
_IGNORED = {"do_sample", "skip_special_tokens", "min_new_tokens", "n", "top_logprobs",
            "spaces_between_special_tokens", "max_length", "prefill_chunk", "raw_logprobs"}


def _sampling_params(gen_config: Any, eos: Sequence[int]) -> Any:
    """SamplingParams from any accepted form; `eos` = stop ids when none are given (the
    engine's own default knows only the official <|im_end|> id, not a trained tokenizer's)."""
    from .engine import SamplingParams
    if gen_config is None:
        gen_config = {}
    if isinstance(gen_config, Mapping):
        items = dict(gen_config)
    elif hasattr(gen_config, "__dataclass_fields__"):  # SamplingParams, GenerationConfig
        items = {f.name: getattr(gen_config, f.name) for f in fields(gen_config)}
    else:
        raise TypeError("gen_config: None, a dict, a SamplingParams or a GenerationConfig-like "
                        f"dataclass, got {type(gen_config).__name__}")
    allowed = {f.name for f in fields(SamplingParams)}
    kw: dict[str, Any] = {}
    for key, value in items.items():
        if key == "logprobs" and isinstance(value, bool):  # GenerationConfig: bool + top_logprobs
            value = int(items.get("top_logprobs") or 0) if value else None
        name = _ALIASES.get(key, key)
        if name in allowed:
            kw[name] = value
        elif key not in _IGNORED and value is not None:
            raise ValueError(f"gen_config.{key}: unknown option; known: {sorted(allowed)}")
    if kw.get("stop") is None:
        kw.pop("stop", None)
    elif isinstance(kw["stop"], str):
        kw["stop"] = (kw["stop"],)
    if kw.get("stop_token_ids") is None:  # [] stays: never stop on a token
        kw["stop_token_ids"] = () if kw.get("ignore_eos") else tuple(eos)
    params = SamplingParams(**kw)
    params.validate()
    return params


class Pipeline:
    """A loaded model with its Engine; call it, stream from it, close it."""

    def __init__(self, engine: Any, tokenizer: Any):
        self.engine, self.tokenizer = engine, tokenizer
        self._closed = False

    def _prompt_ids(self, prompt: Any, where: str) -> list[int]:
        from .chat_format import render_chat_ids
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            return render_chat_ids(list(prompt), self.tokenizer, add_generation_prompt=True)[0]
        raise ValueError(f"{where}: a prompt is a string or a list of chat messages (dicts), "
                         f"got {type(prompt).__name__}")

    @staticmethod
    def _is_batch(prompts: Any) -> bool:
        if isinstance(prompts, str):
            return False
        if isinstance(prompts, Sequence) and prompts and all(isinstance(m, Mapping)
                                                             for m in prompts):
            return False  # one conversation
        return True

    def _stops(self) -> list[int]:
        return list(dict.fromkeys([*getattr(self.tokenizer, "stop_ids", []),
                                   *self.engine.eos_token_ids]))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this pipeline is closed")

    def __call__(self, prompts: Any, gen_config: Any = None) -> Response | list[Response]:
        """Generate for one prompt (-> Response) or a list of prompts (-> list, same order)."""
        self._check_open()
        batch = self._is_batch(prompts)
        items = list(prompts) if batch else [prompts]
        if not items:
            return []
        ids = [self._prompt_ids(p, f"prompts[{i}]") for i, p in enumerate(items)]
        params = _sampling_params(gen_config, self._stops())
        outs = self.engine.generate(ids, params)
        res = [Response(o.text, list(o.token_ids), o.finish_reason, o.prompt_tokens,
                        len(o.token_ids), i) for i, o in enumerate(outs)]
        return res if batch else res[0]

    def stream(self, prompt: Any, gen_config: Any = None) -> Iterator[Response]:
        """Deltas of one prompt as they are generated; the last one has `finish_reason`.

        Leaving the loop early aborts the request and frees its cache blocks.
        """
        self._check_open()
        ids = self._prompt_ids(prompt, "prompt")
        params = _sampling_params(gen_config, self._stops())
        rid = self.engine.add_request(ids, params)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    done = out.finished
                    if out.new_text or out.new_token_ids or done:
                        yield Response(out.new_text, list(out.new_token_ids), out.finish_reason,
                                       out.prompt_tokens, len(out.token_ids), 0, out.logprobs)
        finally:
            if not done:  # its "abort" output is dropped by the next call's filtering
                self.engine.abort(rid)

    def close(self) -> None:
        """Drop the engine (and its KV cache); the pipeline cannot be used afterwards."""
        self._closed = True
        self.engine = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pipeline(model_dir: str, *, device: str | None = None, dtype: str | None = None,
             **engine_kwargs: Any) -> Pipeline:
    """Load a checkpoint folder and build its Engine (`engine_kwargs` go to `Engine`:
    block_size, num_blocks, memory_fraction, max_batch_size, session_len, ...)."""
    from .chat import load_for_inference
    from .engine import Engine
    model, tok = load_for_inference(str(model_dir), device, dtype)
    return Pipeline(Engine(model, tok, **engine_kwargs), tok)


class _CallableModule(types.ModuleType):
    """`internlm2.pipeline(...)` works even after `import internlm2.pipeline` made the package
    attribute this module instead of the function."""

    def __call__(self, model_dir: str, **kwargs: Any) -> Pipeline:
        return pipeline(model_dir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
