"""bench/induction.py: the copy task's batches and mask, and a short run of both sides."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "bench" / "induction.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_induction", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_copy_batch_mask_marks_exactly_the_copyable_targets(bench):
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        ids, mask = bench.copy_batch(gen, 4, 128, 64)
        assert ids.shape == (4, 128) and mask.shape == (4, 127)
        assert ids.min() >= bench.FIRST_ID and ids.max() < bench.FIRST_ID + 64
        span = int((~mask[0]).sum()) + 1  # targets 1 .. span-1 are the first, unpredictable copy
        assert 10 <= span < 60 and (mask == mask[:1]).all()
        targets = ids[:, 1:]
        # every masked target equals the token one span earlier: copying predicts it exactly
        pos = torch.arange(1, 128)[mask[0]]
        assert torch.equal(ids[:, pos], ids[:, pos - span])
        assert targets[mask].numel() == 4 * (128 - span)


def test_short_run_both_sides_agree_and_report(bench, tmp_path):
    res = bench.main(["--steps", "2", "--log-every", "1", "--out", str(tmp_path / "i.json")])
    assert res["learned_step"] == {"ours": None, "theirs": None} and res["ratio"] is None
    (s0, l0, c0), (t0, m0, d0) = res["curves"]["ours"][0], res["curves"]["theirs"][0]
    assert s0 == t0 == 0 and abs(l0 - m0) < 1e-4 and abs(c0 - d0) < 1e-4
    assert abs(c0 - math.log(8192)) < 0.5  # untrained: about uniform over the vocabulary
    assert (tmp_path / "i.json").is_file() and res["tokens"] == 2 * 16 * 128
    with pytest.raises(SystemExit):
        bench.main(["--seq", "64"])
