"""The loader's order as arithmetic (data.loader's module docstring, "Order", has the rules): which global
sample sits at each position of each epoch for each rank, the skip list, and the global ids a batch carries.
Plain NumPy and picklable: the main process and every DataLoader worker hold the same plan and compute the same
positions, so nothing depends on timing or the number of workers."""

from __future__ import annotations

from typing import Optional

import numpy as np


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def merge_ranges(ranges) -> np.ndarray:
    """(n, 2) int64 of the union of [start, end) ranges, sorted and non-overlapping; empty ranges dropped."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a)):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return np.asarray(out, np.int64).reshape(-1, 2)


class OrderPlan:
    """The order, as arithmetic. Training (loop): an endless stream of epochs, each contributing ``used`` =
    N rounded down to whole global batches of positions (e.g. N=1000, global batch 16 -> 992 used, 8 dropped);
    stream position q is epoch q // used, position q % used. A loader started at stream position q0 gives rank
    r, in its micro batch k, the positions q0 + (k*B + i)*W + r for i < B. The stream does not depend on the
    world size or the micro batch, only the global batch fixes the epoch length: a run resumed on another
    world size continues at the same q. Eval (not loop): one pass of all N positions, q0 = 0."""

    def __init__(self, *, names: list[str], paths: list[str], counts: np.ndarray, rank: int, world_size: int,
                 micro_batch: int, seed: int, shuffle: bool, loop: bool, block_shards: int, global_batch: int,
                 skips: np.ndarray | None = None):
        self.names, self.paths = names, paths
        self.skips = np.zeros((0, 2), np.int64) if skips is None else skips  # (n, 2) stream [start, end), sorted
        self.counts = counts  # (n_shards,) int64
        self.rank, self.world, self.B = rank, world_size, micro_batch
        self.seed, self.shuffle, self.loop, self.K = seed, shuffle, loop, block_shards
        self.N = int(counts.sum())
        if loop:
            self.used = self.N // global_batch * global_batch
            self.T = self.used // (micro_batch * world_size)  # micro batches per rank per epoch
        else:
            # rank 0 has the most samples, ceil(N/W); every rank yields ceil(ceil(N/W)/B) batches,
            # e.g. N=1001, W=2, B=8: rank 0 has 501 samples -> 63 batches, rank 1 has 500 -> 62 + 1 padding
            self.used = self.N
            self.T = ceil_div(ceil_div(self.N, world_size), micro_batch)
        self._layout_cache: tuple[int, tuple] | None = None

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard order, block start positions (n_blocks+1,), shard cumulative start in epoch order)."""
        if self._layout_cache is not None and self._layout_cache[0] == epoch:
            return self._layout_cache[1]
        n = len(self.counts)
        order = (np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle
                 else np.arange(n))
        cum = np.concatenate([[0], np.cumsum(self.counts[order])])  # (n+1,)
        # every K-th shard boundary, plus the end; unique() merges empty blocks (shards with 0 samples)
        block_starts = np.unique(cum[np.append(np.arange(0, n, self.K), n)])  # (n_blocks+1,)
        out = (order, block_starts, cum)
        self._layout_cache = (epoch, out)
        return out

    def block_perm(self, epoch: int, block: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch, 1, block]).permutation(size)

    def batches(self, q0: int) -> Optional[int]:
        """Micro batches of this rank from stream position q0: None (endless) when training."""
        return None if self.loop else ceil_div(max(0, ceil_div(self.N - q0, self.world)), self.B)

    def to_stream(self, v: np.ndarray) -> np.ndarray:
        """Stream positions of the logical positions ``v`` (the count of samples handed out before them): each
        skipped range [a, b) pushes every position at or past a by b - a. Skips [(4, 6)]: v 3, 4, 5 -> 3, 6, 7."""
        q = np.asarray(v, np.int64).copy()
        for a, b in self.skips.tolist():  # ascending, so q already holds the earlier ranges' shift
            q[q >= a] += b - a
        return q

    def to_logical(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logical position, skipped?) of stream positions ``q``; the inverse of ``to_stream`` off the skips."""
        q = np.asarray(q, np.int64)
        v, skipped = q.copy(), np.zeros(q.shape, bool)
        for a, b in self.skips.tolist():
            skipped |= (q >= a) & (q < b)
            v -= np.clip(q - a, 0, b - a)  # the part of [a, b) below q
        return v, skipped

    def positions(self, q0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, position) of each sample of micro batch k, from logical start ``q0``; short or empty past the
        end in eval."""
        q = q0 + (k * self.B + np.arange(self.B, dtype=np.int64)) * self.world + self.rank  # (B,)
        if not self.loop:
            q = q[q < self.N]
            return np.zeros_like(q), q
        return np.divmod(self.to_stream(q), self.used)

    def needed(self, q0: int, epoch: int, block: int, w: int, nw: int) -> np.ndarray:
        """Positions of ``block`` of ``epoch`` that DataLoader worker w of nw emits from logical q0 on (sorted)."""
        _, block_starts, _ = self.layout(epoch)
        p = np.arange(block_starts[block], min(block_starts[block + 1], self.used), dtype=np.int64)
        if self.loop:
            v, skipped = self.to_logical(epoch * self.used + p)
            q, keep = v - q0, ~skipped
        else:
            q, keep = p - q0, np.ones(p.shape, bool)
        keep &= (q >= 0) & (q % self.world == self.rank)
        return p[keep & ((q // self.world // self.B) % nw == w)]

    def sample_ids(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        """Global ids (manifest order: shard offset + index in its shard) of the samples at ``pos`` of ``epoch``:
        what the audit (trainer.audit) recomputes from the plan alone, without reading a shard."""
        order, block_starts, cum = self.layout(epoch)
        pos = np.asarray(pos, np.int64)
        b = np.searchsorted(block_starts, pos, side="right") - 1
        at = np.empty_like(pos)  # position of each sample in the epoch's shard order
        for bb in np.unique(b).tolist():
            mask = b == bb
            perm = self.block_perm(epoch, bb, int(block_starts[bb + 1] - block_starts[bb]))
            at[mask] = block_starts[bb] + perm[pos[mask] - block_starts[bb]]
        s = np.searchsorted(cum, at, side="right") - 1
        return self.offsets[order[s]] + at - cum[s]

    @property
    def offsets(self) -> np.ndarray:
        """(n_shards+1,) id of each shard's first sample in manifest order."""
        return np.concatenate([[0], np.cumsum(self.counts)])
