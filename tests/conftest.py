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


class CharTokenizer:
    """Token i is a piece of one or two letters, so text and tokens do not line up."""

    def __init__(self, vocab: int = 256):
        self.pieces = [chr(97 + i % 26) * (1 + (i // 26) % 2) for i in range(vocab)]

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)
