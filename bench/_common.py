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
