"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared, busy cores: one torch thread is several times faster than two.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")` (module) or per test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mask_runs(ids, mask):
    """The contiguous runs of `ids` where `mask` is set, as lists."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs
