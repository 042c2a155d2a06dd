"""Reference-counted KV-cache blocks with a prefix cache, for the paged engine (engine.py).

Only bookkeeping lives here (block ids, reference counts, hashes); the KV tensors belong to
the engine. Kept apart so the accounting can be read and tested on its own.
"""

from __future__ import annotations

from collections import OrderedDict, deque

__all__ = ["BlockPool"]


class BlockPool:
    """Reference-counted KV blocks, a free list, and the hash -> block prefix cache (LRU)."""

    def __init__(self, num_blocks: int):
        # Block 0 is reserved: zeroed padding target for gathers, never handed out.
        self.ref = [0] * (num_blocks + 1)
        self.free: deque[int] = deque(range(1, num_blocks + 1))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed, LRU order
        self.hash_of: dict[int, int] = {}
        self.by_hash: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block, tokens)
        self.touched = [False] * (num_blocks + 1)
        self.total = num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> tuple[int, bool]:
        """A block with ref 1; the flag says whether it has never been written (zero it)."""
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        self.ref[b] = 1
        fresh = not self.touched[b]
        self.touched[b] = True
        return b, fresh

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def lookup(self, h: int, toks: tuple[int, ...]) -> int | None:
        hit = self.by_hash.get(h)
        if hit is None or hit[1] != toks:
            return None
        b = hit[0]
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1
        return b

    def register(self, b: int, h: int, toks: tuple[int, ...]) -> None:
        if h not in self.by_hash and b not in self.hash_of:
            self.by_hash[h] = (b, toks)
            self.hash_of[b] = h
