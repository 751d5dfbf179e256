"""Exact-resume streaming loader for the pretraining shards (tar shards + manifest.json of ``data.shards``).

Order (a pure function of seed, epoch and the manifest; nothing depends on timing or worker count):

1. Epoch ``e`` permutes the split's shards with ``rng(seed, e)`` (manifest order when ``shuffle=False``).
2. Consecutive groups of ``block_shards`` shards form *shuffle blocks*; the samples of block ``b`` are
   permuted with ``rng(seed, e, b)``. This is the bounded shuffle window: a worker holds at most two
   blocks, and of those only the raw bytes of the samples it will itself emit.
3. Concatenating the blocks gives the epoch's global order; position ``p`` goes to rank ``p % world_size``,
   so rank ``r``'s batch ``j`` holds positions ``(j*micro_batch + i)*world_size + r``, i < micro_batch.
   Training (``loop=True``) drops the epoch's remainder: every rank gets ``N // (micro_batch*world_size)``
   batches per epoch, then the next epoch starts. Eval (``loop=False``) is one pass without dropping: ranks
   that run out yield ``is_padding`` batches so every rank yields the same number of batches.
4. A rank's batches are numbered globally (``g = epoch*batches_per_epoch + j``); inside one ``__iter__`` that
   starts at ``g0``, DataLoader worker ``w`` produces batches with ``(g - g0) % num_workers == w``, which
   is exactly the order in which torch's DataLoader round-robins over workers. The batch sequence is thus
   identical for any ``num_workers``.

Exact resume: the main-process iterator counts batches as it yields them (not what workers prefetched);
``state_dict()`` turns that into global samples (``sample_in_epoch``), ``load_state_dict`` turns it back into
``g0``. Skipping is arithmetic: workers never open a block that holds none of their positions, and inside a
block only the needed samples' bytes are kept.

Corrupt data: a sample whose bytes fail ``decode_sample`` (or the checks below), or that is missing because
its shard is unreadable or truncated, is dropped from its batch (the batch is one row shorter), logged with
shard and key, and counted; the stream stays deterministic because the failure is a property of the bytes.
Counts ride inside each batch to the main process (``.stats``); past ``max_bad_samples`` the iterator raises
``DataCorruptionError``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import decode_sample, read_manifest, shard_paths
from trainer import masking

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Tensors a model forward takes; everything else in a batch (keys, is_padding) is bookkeeping.
MODEL_INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
                    "masked_lm_weights", "next_sentence_label")
_PAD_MULTIPLE = 8  # tensor-core / vector friendly sequence length


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore the stop signals: Slurm and the deepspeed launcher signal a rank's whole process tree,
    and torch's worker SIGTERM handler would kill the worker mid-step, crashing the rank before it can save.
    The rank decides when to stop; its workers end with it (torch's watchdog exits them when the parent goes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class DataCorruptionError(RuntimeError):
    """More corrupt/missing samples than ``max_bad_samples``: the data, not the run, needs fixing."""


def model_inputs(batch: dict) -> dict:
    """The tensors of a batch that ``engine(**...)`` accepts (drops ``keys``/``is_padding``)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS}


# ---------------------------------------------------------------------------------------------------
# Tar index (WebDataset layout: consecutive members sharing a basename form one sample)
# ---------------------------------------------------------------------------------------------------
def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 size for members >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _iter_members(buf: bytes, start: int, end: int, check: bool) -> Iterator[tuple[int, str, int, int, int]]:
    """(member_start, name, data_start, size, next) of regular files in ``buf[start:end]``.

    ``member_start`` includes preceding GNU long-name / pax headers. Raises ValueError at the first
    corrupt or truncated header (``check`` also verifies header checksums: done once when indexing).
    """
    pos, pending, mstart = start, None, start
    while pos + 512 <= end:
        hdr = buf[pos:pos + 512]
        if hdr[0] == 0 and hdr.count(0) == 512:
            return  # end-of-archive marker
        if check:
            stored = _octal(hdr[148:156])
            if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # 256 = the checksum field as 8 spaces
                raise ValueError(f"bad tar header checksum at byte {pos}")
        size = _octal(hdr[124:136])
        dstart = pos + 512
        nxt = dstart + size + (-size) % 512
        if dstart + size > end:
            raise ValueError(f"tar member at byte {pos} truncated ({size} bytes declared, {end - dstart} left)")
        kind = hdr[156:157]
        if kind == b"L":  # GNU long name for the next member
            pending = buf[dstart:dstart + size].split(b"\0", 1)[0].decode("utf-8")
        elif kind == b"x":  # pax extended header: only "path" matters here
            for rec in buf[dstart:dstart + size].split(b"\n"):
                if b" path=" in rec:
                    pending = rec.split(b" path=", 1)[1].decode("utf-8")
        elif kind == b"g":
            mstart = nxt
        else:
            if pending is not None:
                name = pending
            else:
                name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8")
                if hdr[257:263] == b"ustar\0":
                    prefix = hdr[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix.decode("utf-8") + "/" + name
            pending = None
            if kind in (b"0", b"\0", b"7"):
                yield mstart, name, dstart, size, nxt
            mstart = nxt
        pos = nxt
    if check:  # a complete archive ends with zero blocks; running out of bytes first means it was cut
        raise ValueError(f"archive ends at byte {end} without the end-of-archive marker (truncated)")


def _split_name(name: str) -> tuple[str | None, str]:
    """WebDataset's base_plus_ext: key = path up to the first dot of the basename, ext = the rest."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _index_tar(buf: bytes) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Byte ranges (starts, ends) of the samples of a tar image, and the error that stopped parsing."""
    starts: list[int] = []
    ends: list[int] = []
    cur = None
    err = None
    try:
        for mstart, name, _, _, nxt in _iter_members(buf, 0, len(buf), check=True):
            key, _ = _split_name(name)
            if key is None:
                continue
            if key != cur:
                starts.append(mstart)
                ends.append(nxt)
                cur = key
            else:
                ends[-1] = nxt
    except (ValueError, UnicodeDecodeError) as e:
        err = str(e)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64), err


def _raw_sample(buf: bytes, start: int, end: int) -> dict:
    """Raw WebDataset sample (``__key__`` + bytes per extension) from one sample's tar byte range."""
    raw: dict[str, Any] = {}
    for _, name, dstart, size, _ in _iter_members(buf, start, end, check=False):
        key, ext = _split_name(name)
        if key is None:
            continue
        raw.setdefault("__key__", key)
        raw[ext] = buf[dstart:dstart + size]
    return raw


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# The deterministic plan (picklable; shared by the main process and the workers)
# ---------------------------------------------------------------------------------------------------
class _Plan:
    def __init__(self, *, names: list[str], paths: list[str], counts: np.ndarray, rank: int, world_size: int,
                 micro_batch: int, seed: int, shuffle: bool, loop: bool, block_shards: int):
        self.names, self.paths = names, paths
        self.counts = counts  # (n_shards,) int64
        self.rank, self.world, self.B = rank, world_size, micro_batch
        self.seed, self.shuffle, self.loop, self.K = seed, shuffle, loop, block_shards
        self.N = int(counts.sum())
        per_step = micro_batch * world_size
        if loop:
            # drop the remainder: e.g. N=1000, B=8, W=2 -> 62 batches/rank, 992 samples used, 8 dropped
            self.T = self.N // per_step
            self.used = self.T * per_step
        else:
            # rank 0 has the most samples, ceil(N/W); every rank yields ceil(ceil(N/W)/B) batches,
            # e.g. N=1001, W=2, B=8: rank 0 has 501 samples -> 63 batches, rank 1 has 500 -> 62 + 1 padding
            self.T = _ceil_div(_ceil_div(self.N, world_size), micro_batch)
            self.used = self.N
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

    def epoch_batch(self, g: int) -> tuple[int, int]:
        return divmod(g, self.T) if self.loop else (0, g)

    def positions(self, j: int) -> np.ndarray:
        """Global positions of rank batch ``j`` (within its epoch); short/empty past the end in eval."""
        p = (j * self.B + np.arange(self.B, dtype=np.int64)) * self.world + self.rank  # (B,)
        return p[p < self.used]


class _Block:
    """Raw bytes of the samples one worker needs from one shuffle block, plus bookkeeping."""

    def __init__(self, plan: _Plan, epoch: int, b: int, need_pos: np.ndarray):
        order, block_starts, cum = plan.layout(epoch)
        self.start = int(block_starts[b])
        size = int(block_starts[b + 1]) - self.start
        self.perm = plan.block_perm(epoch, b, size)  # (size,) position-in-block -> sample-in-block
        # shards of this block (in epoch order) and where each begins inside the block
        first = int(np.searchsorted(cum, self.start))
        last = int(np.searchsorted(cum, self.start + size))
        self.shards = order[first:last]
        self.shard_start = cum[first:last + 1] - self.start  # (k+1,)
        self.off = np.full(size, -1, np.int64)  # sample-in-block -> offset in blob (-1 = missing)
        self.len = np.zeros(size, np.int64)
        self.bad_shards: list[str] = []
        need = np.zeros(size, bool)
        need[self.perm[need_pos - self.start]] = True
        pieces, total = [], 0
        for i, s in enumerate(self.shards):
            lo, hi = int(self.shard_start[i]), int(self.shard_start[i + 1])
            want = np.flatnonzero(need[lo:hi])  # in-shard indices this worker will emit
            if len(want) == 0:
                continue
            name = plan.names[s]
            try:
                with open(plan.paths[s], "rb") as f:
                    buf = f.read()
            except OSError as e:
                self._bad(name, f"unreadable ({e.strerror or e}); its {hi - lo} samples are skipped")
                continue
            starts, ends, err = _index_tar(buf)
            if err is not None or len(starts) != hi - lo:
                why = f"{err}; " if err else ""
                self._bad(name, f"{why}{len(starts)} samples found, manifest says {hi - lo}"
                                f"{'; the missing ones are skipped' if len(starts) < hi - lo else ''}")
            for k in want[want < len(starts)]:
                a, z = int(starts[k]), int(ends[k])
                self.off[lo + k] = total
                self.len[lo + k] = z - a
                pieces.append(buf[a:z])
                total += z - a
            del buf
        self.blob = b"".join(pieces)  # one bytes object: no per-sample Python objects kept

    def _bad(self, name: str, why: str) -> None:
        log.warning("shard %s: %s", name, why)
        self.bad_shards.append(name)

    def shard_name(self, plan: _Plan, sample: int) -> str:
        i = int(np.searchsorted(self.shard_start, sample, side="right")) - 1
        return plan.names[self.shards[i]]


class _Stream(IterableDataset):
    """Batches ``g0, g0+1, ...`` of one rank; inside a DataLoader worker ``w`` emits ``g0+w, g0+w+nw, ...``."""

    def __init__(self, plan: _Plan, g0: int, settings: dict):
        super().__init__()
        self.plan, self.g0, self.s = plan, g0, settings

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan
        end = None if plan.loop else plan.T
        blocks: dict[tuple[int, int], _Block] = {}
        g = self.g0 + w
        while end is None or g < end:
            epoch, j = plan.epoch_batch(g)
            pos = plan.positions(j)
            if len(pos) == 0:
                yield self._padding_batch(g)
                g += nw
                continue
            _, block_starts, _ = plan.layout(epoch)
            bidx = np.searchsorted(block_starts, pos, side="right") - 1  # (n,)
            for key in [k for k in blocks if k < (epoch, int(bidx[0]))]:
                del blocks[key]  # never revisited: positions only grow
            new_bad: list[str] = []
            rows, bad = [], 0
            for p, b in zip(pos.tolist(), bidx.tolist()):
                blk = blocks.get((epoch, b))
                if blk is None:
                    blk = _Block(plan, epoch, b, self._needed(epoch, b, w, nw))
                    blocks[(epoch, b)] = blk
                    new_bad += blk.bad_shards
                sample = int(blk.perm[p - blk.start])
                d = self._decode(blk, sample, epoch)
                if d is None:
                    bad += 1
                else:
                    rows.append(d)
            if not rows:
                if plan.loop:
                    raise DataCorruptionError(
                        f"all {len(pos)} samples of batch {j} (epoch {epoch}, rank {plan.rank}) are corrupt or "
                        f"missing: the shards are damaged (see the warnings above)")
                batch = self._padding_batch(g)
            else:
                batch = self._collate(rows)
                if not plan.loop:
                    batch["is_padding"] = False
            batch["_g"] = g
            batch["_bad_samples"] = bad
            batch["_bad_shards"] = new_bad
            yield batch
            g += nw

    def _needed(self, epoch: int, b: int, w: int, nw: int) -> np.ndarray:
        """Positions of block ``b`` that this worker emits from ``g0`` on (sorted)."""
        plan = self.plan
        _, block_starts, _ = plan.layout(epoch)
        q = np.arange(block_starts[b], block_starts[b + 1], dtype=np.int64)
        q = q[(q % plan.world == plan.rank) & (q < plan.used)]
        gg = (q // plan.world) // plan.B + (epoch * plan.T if plan.loop else 0)
        return q[(gg >= self.g0) & ((gg - self.g0) % nw == w)]

    def _decode(self, blk: _Block, sample: int, epoch: int) -> dict | None:
        plan, s = self.plan, self.s
        if blk.off[sample] < 0:
            return None  # missing from its shard: reported once per shard when the block was loaded
        a = int(blk.off[sample])
        raw = None
        try:
            raw = _raw_sample(blk.blob, a, a + int(blk.len[sample]))
            d = decode_sample(raw)
            n = len(d["input_ids"])
            npred = len(d["masked_lm_positions"])
            if n > s["max_seq_len"]:
                raise ValueError(f"{n} tokens > max_seq_len {s['max_seq_len']}")
            if len(d["segment_ids"]) != n or len(d["masked_lm_ids"]) != npred:
                raise ValueError("field lengths disagree")
            if npred > s["max_predictions"]:
                raise ValueError(f"{npred} predictions > max_predictions {s['max_predictions']}")
            if npred and (d["masked_lm_positions"].min() < 0 or d["masked_lm_positions"].max() >= n):
                raise ValueError("masked position outside the sequence")
            ids = d["input_ids"]
            if n and (ids.min() < 0 or ids.max() >= s["vocab_size"]):
                raise ValueError(f"token id outside [0, {s['vocab_size']})")
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt sample, counted + logged
            key = raw.get("__key__", "?") if isinstance(raw, dict) else "?"
            log.warning("shard %s: corrupt sample %r skipped: %s: %s", blk.shard_name(plan, sample), key,
                        type(e).__name__, e)
            return None
        if s["dynamic_masking"]:
            tokens = masking.restore_original(d["input_ids"], d["masked_lm_positions"], d["masked_lm_ids"])
            rng = masking.sample_rng(plan.seed, epoch, d["__key__"])
            d["input_ids"], d["masked_lm_positions"], d["masked_lm_ids"] = masking.remask(
                tokens, rng, max_predictions=s["max_predictions"], masked_lm_prob=s["masked_lm_prob"],
                vocab_size=s["vocab_size"], cls_id=s["cls_id"], sep_id=s["sep_id"], mask_id=s["mask_id"])
        return d

    def _seq_len(self, longest: int) -> int:
        # round up to a multiple of 8, but never past max_seq_len (e.g. 125 -> 128; with max 100: 97 -> 100)
        r = -(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE
        return min(r, max(longest, self.s["max_seq_len"]))

    def _collate(self, rows: list[dict]) -> dict:
        s = self.s
        B, P = len(rows), s["max_predictions"]
        S = self._seq_len(max(len(d["input_ids"]) for d in rows))
        ids = np.full((B, S), s["pad_id"], np.int64)  # (B, S)
        tt = np.zeros((B, S), np.int64)  # (B, S)
        am = np.zeros((B, S), np.int64)  # (B, S)
        mpos = np.zeros((B, P), np.int64)  # (B, P)
        mids = np.zeros((B, P), np.int64)  # (B, P)
        mw = np.zeros((B, P), np.float32)  # (B, P)
        nsp = np.zeros(B, np.int64)  # (B,)
        for i, d in enumerate(rows):
            n, k = len(d["input_ids"]), len(d["masked_lm_positions"])
            ids[i, :n] = d["input_ids"]
            tt[i, :n] = d["segment_ids"]
            am[i, :n] = 1
            mpos[i, :k] = d["masked_lm_positions"]
            mids[i, :k] = d["masked_lm_ids"]
            mw[i, :k] = 1.0
            nsp[i] = int(d["next_sentence_label"])
        # numpy, not tensors: a worker's batch is pickled through the DataLoader pipe (~100 KB at B=32,
        # S=128), which is ~5x cheaper than torch's per-tensor shared-memory files; the main process wraps
        # them with torch.from_numpy (no copy)
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am, "masked_lm_positions": mpos,
                "masked_lm_ids": mids, "masked_lm_weights": mw, "next_sentence_label": nsp,
                "keys": [d["__key__"] for d in rows]}

    def _padding_batch(self, g: int) -> dict:
        """One dummy row ([CLS] [SEP], no predictions) so ZeRO-3's collectives still run; not to be counted."""
        s = self.s
        row = {"__key__": "", "input_ids": np.array([s["cls_id"], s["sep_id"]]), "segment_ids": np.zeros(2),
               "masked_lm_positions": np.zeros(0, np.int64), "masked_lm_ids": np.zeros(0, np.int64),
               "next_sentence_label": 0}
        batch = self._collate([row])
        batch["keys"] = []
        batch["is_padding"] = True
        batch.update({"_g": g, "_bad_samples": 0, "_bad_shards": []})
        return batch


def _identity(x: Any) -> Any:
    return x


# ---------------------------------------------------------------------------------------------------
# Public loader
# ---------------------------------------------------------------------------------------------------
class PretrainLoader:
    """Iterable of batches of one rank; see the module docstring for order, resume and corruption rules.

    Args:
        shard_dir: folder with ``manifest.json`` (from ``python -m data.build``).
        split: ``"train"`` or ``"valid"``.
        micro_batch: samples per batch on this rank.
        rank, world_size: data-parallel position; all ranks must use the same seed and settings.
        seed: shuffle seed (shard order per epoch, block permutations, dynamic masks).
        num_workers: DataLoader worker processes (0 = in the main process); does not change the batches.
        shuffle: permute shards and samples per epoch (False: manifest order).
        loop: True = endless epochs, remainder dropped (training); False = one pass, padded (eval).
        dynamic_masking: re-draw the masked positions per (seed, epoch, key) with Google's 80/10/10 rules.
        max_bad_samples: corrupt/missing samples this rank tolerates before DataCorruptionError.
        block_shards: shards per shuffle block (the shuffle window; a worker keeps <= 2 blocks' worth of
            its own samples' bytes).
        prefetch_factor: batches each worker prepares ahead (DataLoader's).
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 1, shuffle: bool = True,
                 loop: bool = True, dynamic_masking: bool = False, max_bad_samples: int = 1000,
                 block_shards: int = 4, prefetch_factor: int = 2):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if num_workers < 0 or block_shards < 1 or max_bad_samples < 0:
            raise ValueError(f"num_workers ({num_workers}) and max_bad_samples ({max_bad_samples}) must be >= 0, "
                             f"block_shards ({block_shards}) >= 1")
        self.shard_dir, self.split = os.fspath(shard_dir), split
        manifest = read_manifest(self.shard_dir)
        paths = shard_paths(self.shard_dir, split)
        shards = manifest["splits"][split]["shards"]
        tok, st = manifest["tokenizer"], manifest["settings"]
        counts = np.asarray([int(sh["samples"]) for sh in shards], np.int64)
        names = [sh["name"] for sh in shards]
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.seed, self.num_workers, self.shuffle, self.loop = seed, num_workers, shuffle, loop
        self.dynamic_masking, self.max_bad_samples, self.block_shards = dynamic_masking, max_bad_samples, block_shards
        self.prefetch_factor = prefetch_factor
        self._plan = _Plan(names=names, paths=paths, counts=counts, rank=rank, world_size=world_size,
                           micro_batch=micro_batch, seed=seed, shuffle=shuffle, loop=loop, block_shards=block_shards)
        if self._plan.T == 0:
            raise ValueError(f"{self.shard_dir}: split {split!r} has {self._plan.N} samples, fewer than one step "
                             f"of micro_batch {micro_batch} x world_size {world_size}")
        self._settings = {
            "max_seq_len": int(st["max_seq_len"]), "max_predictions": int(st["max_predictions"]),
            "masked_lm_prob": float(st.get("masked_lm_prob", 0.15)), "vocab_size": int(tok["vocab_size"]),
            "pad_id": int(tok["pad_id"]), "cls_id": int(tok["cls_id"]), "sep_id": int(tok["sep_id"]),
            "mask_id": int(tok["mask_id"]), "dynamic_masking": dynamic_masking,
        }
        self.pad_id = self._settings["pad_id"]
        self.max_predictions = self._settings["max_predictions"]
        self._digest = hashlib.sha1(
            "\n".join(f"{n}:{c}" for n, c in zip(names, counts.tolist())).encode()).hexdigest()
        self._next_g = 0  # next global batch index of this rank = batches yielded so far
        self._resume_pending = False
        self._bad_samples = 0
        self._bad_shard_names: set[str] = set()

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return self._plan.N

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (training: remainder dropped; eval: incl. padding batches)."""
        return self._plan.T

    def __len__(self) -> int:
        return self._plan.T

    # --- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        if not self.loop and not self._resume_pending:
            self._next_g = 0  # every eval pass starts at the beginning unless a state was just loaded
        self._resume_pending = False
        g0 = self._next_g
        if not self.loop and g0 >= self._plan.T:
            g0 = self._next_g = 0
        stream = _Stream(self._plan, g0, self._settings)
        if self.num_workers == 0:
            source: Any = iter(stream)
        else:
            source = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                     persistent_workers=False, prefetch_factor=self.prefetch_factor,
                                     collate_fn=_identity, worker_init_fn=_ignore_stop_signals))
        return self._consume(source)

    def _consume(self, source: Iterator[dict]) -> Iterator[dict]:
        for batch in source:
            g = batch.pop("_g")
            if g != self._next_g:
                raise RuntimeError(f"loader order broken: got batch {g}, expected {self._next_g}")
            self._bad_samples += int(batch.pop("_bad_samples"))
            self._bad_shard_names.update(batch.pop("_bad_shards"))
            self._next_g = g + 1
            for k in MODEL_INPUT_KEYS:
                batch[k] = torch.from_numpy(batch[k])
            if self._bad_samples > self.max_bad_samples:
                raise DataCorruptionError(
                    f"{self.shard_dir} split {self.split!r}: {self._bad_samples} corrupt or missing samples on rank "
                    f"{self.rank}, more than max_bad_samples={self.max_bad_samples}; bad shards: "
                    f"{sorted(self._bad_shard_names) or 'none (individual samples)'}. Rebuild or remove the "
                    f"damaged shards (the warnings above name shard and key), or raise max_bad_samples.")
            yield batch

    # --- stats and state ---------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """This rank's skip counts (bad_samples: dropped from its batches; bad_shards: distinct damaged shards)."""
        return {"bad_samples": self._bad_samples, "bad_shards": len(self._bad_shard_names),
                "bad_shard_names": sorted(self._bad_shard_names)}

    def _position(self) -> tuple[int, int]:
        epoch, j = self._plan.epoch_batch(self._next_g)
        return epoch, j * self.micro_batch * self.world_size

    def state_dict(self) -> dict:
        epoch, sample_in_epoch = self._position()
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "sample_in_epoch": sample_in_epoch,  # global samples (all ranks) consumed in this epoch
            "samples_seen": epoch * self._plan.used + sample_in_epoch,
            "seed": self.seed, "world_size": self.world_size, "micro_batch": self.micro_batch,
            "shuffle": self.shuffle, "loop": self.loop, "block_shards": self.block_shards,
            "dynamic_masking": self.dynamic_masking, "split": self.split,
            "num_samples": self._plan.N, "shards_digest": self._digest,
            "bad_samples": self._bad_samples, "bad_shard_names": sorted(self._bad_shard_names),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r}, this code reads {STATE_VERSION}")
        mine = self.state_dict()
        for k in ("seed", "world_size", "micro_batch", "shuffle", "loop", "block_shards", "dynamic_masking",
                  "split", "num_samples", "shards_digest"):
            if sd.get(k) != mine[k]:
                raise ValueError(f"cannot resume the data position exactly: {k} is {sd.get(k)!r} in the checkpoint "
                                 f"but {mine[k]!r} now ({self.shard_dir}, split {self.split!r})")
        per_step = self.micro_batch * self.world_size
        epoch, sie = int(sd["epoch"]), int(sd["sample_in_epoch"])
        j = sie // per_step
        if sie % per_step or epoch < 0 or (j >= self._plan.T if self.loop else j > self._plan.T):
            raise ValueError(f"loader state sample_in_epoch={sie} is not a multiple of micro_batch x world_size = "
                             f"{per_step} inside an epoch of {self._plan.T} batches per rank")
        self._next_g = epoch * self._plan.T + j if self.loop else j
        self._resume_pending = True
        self._bad_samples = int(sd.get("bad_samples", 0))
        self._bad_shard_names = set(sd.get("bad_shard_names", []))


# ---------------------------------------------------------------------------------------------------
# Benchmark: python -m trainer.loader SHARD_DIR
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure loader throughput (samples/s) on real shards.")
    ap.add_argument("shard_dir")
    ap.add_argument("--split", default="train")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--num-workers", type=int, default=0, help="0 = decode+collate in this one process")
    ap.add_argument("--dynamic-masking", action="store_true")
    a = ap.parse_args(argv)
    loader = PretrainLoader(a.shard_dir, a.split, a.micro_batch, num_workers=a.num_workers,
                            dynamic_masking=a.dynamic_masking)
    # timed from the start: includes reading + indexing the tar blocks (and worker start-up if any)
    t0, n, tokens = time.perf_counter(), 0, 0
    for _, batch in zip(range(a.batches), loader):
        n += len(batch["keys"])
        tokens += int(batch["attention_mask"].sum())
    dt = time.perf_counter() - t0
    print(f"{n} samples ({tokens} tokens) in {dt:.2f} s: {n / dt:,.0f} samples/s, {tokens / dt:,.0f} tokens/s "
          f"(num_workers={a.num_workers}, micro_batch={a.micro_batch}, dynamic_masking={a.dynamic_masking}); "
          f"stats {loader.stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
