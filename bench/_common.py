"""Shared by the bench scripts: write the figures (atomically) and print them as the last line."""

import json
from pathlib import Path


def emit_results(results: dict, path: str | Path | None) -> dict:
    """Write `results` to `path` (temp file + rename) when given, then print it as one JSON line."""
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(p)
    print(json.dumps(results))
    return results


def load_llama_weights(ref, ours, config) -> None:
    """Load `ours`' weights into transformers' LlamaForCausalLM `ref` through the production
    converter (internlm2.hf.to_llama_state_dict), so both sides start from the same weights.
    RuntimeError when anything but the non-persistent rotary buffers fails to match."""
    from internlm2.hf import to_llama_state_dict

    missing, unexpected = ref.load_state_dict(to_llama_state_dict(ours.state_dict(), config),
                                              strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
