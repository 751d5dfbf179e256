"""Exact-resume streaming loader for the pretraining shards (tar shards + manifest.json of ``data.shards``).

Order (a pure function of seed, epoch, the manifest and the skip list; nothing depends on timing or worker
count):

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
5. Skips (training only): ranges [a, b) of the endless stream (epoch * used + position) that are passed over,
   e.g. the data that led a run into a divergence (trainer.rollback). Positions above are *logical* (samples
   handed out); logical ``v`` sits at stream position ``v`` plus the lengths of the skipped ranges before it.
   With no skips the two are the same. Every batch carries the global ``ids`` of its samples (manifest order),
   which the plan alone recomputes (``PretrainLoader.ids_at``; trainer.audit checks runs against it).

Exact resume: the main-process iterator counts batches as it yields them (not what workers prefetched);
``state_dict()`` turns that into global samples (``sample_in_epoch``), ``load_state_dict`` turns it back into
``g0``. Skipping is arithmetic: workers never open a block that holds none of their positions, and inside a
block only the needed samples' bytes are kept.

Reading: a worker reads each shard of a block it needs with webdataset's tar iteration
(``data.shards.iter_samples``) and keeps the record bytes of its own samples only, in one blob. Sample ``k`` of
a shard is the ``k``-th sample the archive yields, so damage stays inside its shard: a missing, zero-byte,
truncated or garbled shard loses its own samples from the damage on, and every other shard decodes as if
nothing happened (the positions come from the manifest's counts, not from the bytes).

Damaged data: a sample that ``data.shards.read_sample`` rejects (it does not decode, breaks a field's range, or
its member name is not UTF-8) is *corrupt*; one whose shard is missing, not a plain bounded tar file, truncated
or garbled before it is *missing* (``data.shards.iter_samples``). Either is dropped from its batch (the batch
is one row shorter; one that lost every sample becomes an ``is_padding`` batch) and counted; the stream stays
deterministic because the failure is a property of the bytes. What a worker found (the shards it opened, the
damaged ones with their found/expected counts, the corrupt samples) rides inside the batches to the main
process, which logs each damaged shard once and keeps the counts (``.stats``, ``.health_report()``). Whether
the run may go on is decided over all ranks by ``data.health.DataHealth``.

Workers start from a fork server (data.workers, ``multiprocessing_context="forkserver"``): a worker forked from the
training process itself, once it runs threads (queue feeders, TensorBoard's writer), can block forever in
CPython's after-fork hook on a lock another thread held (docs/loader.md has the measurements). Every wait
for a worker is bounded (``timeout_s``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import masking
from common.errors import DataError
from data.order import OrderPlan, merge_ranges
from data.workers import WorkerSignals, worker_context
from data.shards import (ShardScan, iter_samples, read_manifest, read_sample, sample_limits, shard_paths,
                         verify_shard)

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Tensors a model forward takes; everything else in a batch is bookkeeping, known on the host: keys, is_padding,
# no_padding (every row fills the sequence length), tokens (real tokens) and predictions (real masked positions).
MODEL_INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
                    "masked_lm_weights", "next_sentence_label")
PAD_MULTIPLE = 8  # tensor-core / vector friendly sequence length
WORKER_TIMEOUT_S = 600.0  # longest wait for one batch from a worker (a block read from slow storage included)
_POLL_S = 5.0  # torch checks that the workers are alive each time a wait of this length ends empty


def padded_length(longest: int, max_len: int | None = None) -> int:
    """Round a batch's longest sequence up to a multiple of 8, never past ``max_len`` (125 -> 128;
    with max 100: 97 -> 100)."""
    r = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    return r if max_len is None else min(r, max(longest, max_len))


def model_inputs(batch: dict) -> dict:
    """The tensors of a batch that ``engine(**...)`` accepts. A batch marked ``no_padding`` goes without its
    attention mask (all ones): the model then skips masking and unpadding without asking the device."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if not (k == "attention_mask" and batch.get("no_padding"))}


class _Block:
    """Record bytes of the samples one worker needs from one shuffle block, plus what reading found."""

    def __init__(self, plan: OrderPlan, epoch: int, b: int, need_pos: np.ndarray, member_bound: int):
        order, block_starts, cum = plan.layout(epoch)
        self.start = int(block_starts[b])
        size = int(block_starts[b + 1]) - self.start
        self.perm = plan.block_perm(epoch, b, size)  # (size,) position-in-block -> sample-in-block
        # shards of this block (in epoch order) and where each begins inside the block
        first = int(np.searchsorted(cum, self.start))
        last = int(np.searchsorted(cum, self.start + size))
        self.shards = order[first:last]
        self.shard_start = cum[first:last + 1] - self.start  # (k+1,)
        # sample-in-block -> [start, end) of its record in `blob` and of its key in `keys`; -1 = missing
        self.rec = np.full((size, 2), -1, np.int64)
        self.key = np.full((size, 2), -1, np.int64)
        self.damaged: list[tuple[str, str, int, int]] = []  # (shard, what is wrong, found, expected)
        self.opened: list[tuple[str, int]] = []  # (shard, expected samples) this worker read
        need = np.zeros(size, bool)
        need[self.perm[need_pos - self.start]] = True
        recs, keys, n_rec, n_key = [], [], 0, 0
        for i, s in enumerate(self.shards):
            lo, hi = int(self.shard_start[i]), int(self.shard_start[i + 1])
            if not need[lo:hi].any():
                continue
            scan = ShardScan(plan.paths[s])
            self.opened.append((plan.names[s], hi - lo))
            for k, raw in enumerate(iter_samples(plan.paths[s], scan, member_bound)):
                if k >= hi - lo or not need[lo + k]:
                    continue  # more samples than the manifest says are reported below, never used
                rec = raw.get("bin", b"")
                key = raw["__key__"].encode("utf-8", "surrogateescape")  # a non-UTF-8 name: read_sample rejects it
                self.rec[lo + k] = (n_rec, n_rec + len(rec))  # offsets from the bytes actually kept
                self.key[lo + k] = (n_key, n_key + len(key))
                recs.append(rec)
                keys.append(key)
                n_rec += len(rec)
                n_key += len(key)
            problem = scan.describe(hi - lo)
            if problem:
                self.damaged.append((plan.names[s], problem, min(scan.samples, hi - lo), hi - lo))
        self.blob = b"".join(recs)  # two bytes objects: no per-sample Python objects kept
        self.keys = b"".join(keys)

    def shard_name(self, plan: OrderPlan, sample: int) -> str:
        i = int(np.searchsorted(self.shard_start, sample, side="right")) - 1
        return plan.names[self.shards[i]]

    def sample_id(self, plan: OrderPlan, sample: int) -> int:
        """The global id of sample-in-block ``sample`` (as OrderPlan.sample_ids numbers it)."""
        i = int(np.searchsorted(self.shard_start, sample, side="right")) - 1
        return int(plan.offsets[self.shards[i]] + sample - self.shard_start[i])


class _Stream(IterableDataset):
    """Micro batches k = 0, 1, ... of one rank from stream position q0; DataLoader worker w of nw emits
    k = w, w + nw, ..., which is the order in which torch's DataLoader round-robins over its workers."""

    def __init__(self, plan: OrderPlan, q0: int, settings: dict):
        super().__init__()
        self.plan, self.q0, self.s = plan, q0, settings

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan
        end = plan.batches(self.q0)
        blocks: dict[tuple[int, int], _Block] = {}
        k = w
        while end is None or k < end:
            epochs, pos = plan.positions(self.q0, k)
            if len(pos) == 0:
                yield self._padding_batch(k)
                k += nw
                continue
            bidx = [int(np.searchsorted(plan.layout(int(e))[1], p, side="right") - 1)
                    for e, p in zip(epochs.tolist(), pos.tolist())]
            for key in [key for key in blocks if key < (int(epochs[0]), bidx[0])]:
                del blocks[key]  # never revisited: positions only grow
            new_bad: list[tuple[str, str, int, int]] = []
            opened: list[tuple[str, int]] = []
            rows, missing, notes = [], 0, []
            for e, p, b in zip(epochs.tolist(), pos.tolist(), bidx):
                blk = blocks.get((e, b))
                if blk is None:
                    blk = _Block(plan, e, b, plan.needed(self.q0, e, b, w, nw), self.s["limits"].max_record_bytes)
                    blocks[(e, b)] = blk
                    new_bad += blk.damaged
                    opened += blk.opened
                sample = int(blk.perm[p - blk.start])
                d = self._decode(blk, sample, e)
                if d == "":
                    missing += 1
                elif isinstance(d, tuple):
                    notes.append(d)
                else:
                    d["__id__"] = blk.sample_id(plan, sample)
                    rows.append(d)
            if not rows:  # every sample lost: a stand-in, so this rank still joins the step's collectives
                batch = self._padding_batch(k)
            else:
                batch = self._collate(rows)
                batch["is_padding"] = False
            batch.update(_k=k, _read=len(pos), _missing=missing, _bad_shards=new_bad, _opened=opened, _notes=notes)
            yield batch
            k += nw

    def _decode(self, blk: _Block, sample: int, epoch: int) -> dict | tuple[str, str] | str:
        """The decoded sample, or why not: "" when its shard lost it (reported once per shard), else
        (shard, line) for a corrupt record."""
        plan, s = self.plan, self.s
        (a, z), (ka, kz) = blk.rec[sample], blk.key[sample]
        if a < 0:
            return ""
        key = blk.keys[ka:kz].decode("utf-8", "surrogateescape")
        try:
            d = read_sample({"__key__": key, "bin": blk.blob[a:z]}, s["limits"])
        except ValueError as e:  # the bytes are not a valid record: "sample 'KEY': what is wrong"
            name = blk.shard_name(plan, sample)
            return name, f"shard {name}: corrupt {e}; skipped"
        if s["dynamic_masking"]:
            tokens = masking.restore_original(d["input_ids"], d["masked_lm_positions"], d["masked_lm_ids"])
            rng = masking.sample_rng(plan.seed, epoch, d["__key__"])
            d["input_ids"], d["masked_lm_positions"], d["masked_lm_ids"] = masking.remask(
                tokens, rng, max_predictions=s["max_predictions"], masked_lm_prob=s["masked_lm_prob"],
                vocab_size=s["vocab_size"], cls_id=s["cls_id"], sep_id=s["sep_id"], mask_id=s["mask_id"])
        return d

    def _collate(self, rows: list[dict]) -> dict:
        s = self.s
        B, P = len(rows), s["max_predictions"]
        S = padded_length(max(len(d["input_ids"]) for d in rows), s["max_seq_len"])
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
                "keys": [d["__key__"] for d in rows], "ids": [d.get("__id__", -1) for d in rows],
                "no_padding": bool(am.all()), "tokens": int(am.sum()), "predictions": int(mw.sum())}

    def _padding_batch(self, k: int) -> dict:
        """One dummy row ([CLS] [SEP], no predictions) so the rank still runs the step's collectives (ZeRO's
        reductions, ZeRO-3's gathers); it is not to be counted, and a trainer gives it zero weight."""
        s = self.s
        row = {"__key__": "", "input_ids": np.array([s["cls_id"], s["sep_id"]]), "segment_ids": np.zeros(2),
               "masked_lm_positions": np.zeros(0, np.int64), "masked_lm_ids": np.zeros(0, np.int64),
               "next_sentence_label": 0}
        batch = self._collate([row])
        batch["keys"], batch["ids"] = [], []
        batch["is_padding"] = True
        batch.update(_k=k, _read=0, _missing=0, _bad_shards=[], _opened=[], _notes=[])
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
        block_shards: shards per shuffle block (the shuffle window; a worker keeps <= 2 blocks' worth of
            its own samples' bytes).
        prefetch_factor: batches each worker prepares ahead (DataLoader's).
        timeout_s: longest wait for a worker's next batch before the iterator raises (never waits forever).
        global_batch: samples per optimizer step over all ranks (micro x accumulation x world; default micro x
            world): an epoch uses a whole number of them, the same for any world size that gives that batch.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 1, shuffle: bool = True,
                 loop: bool = True, dynamic_masking: bool = False, block_shards: int = 4, prefetch_factor: int = 2,
                 timeout_s: float = WORKER_TIMEOUT_S, global_batch: Optional[int] = None):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        global_batch = global_batch or micro_batch * world_size
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x "
                             f"world_size {world_size}")
        if num_workers < 0 or block_shards < 1:
            raise ValueError(f"num_workers ({num_workers}) must be >= 0, block_shards ({block_shards}) >= 1")
        self.shard_dir, self.split = os.fspath(shard_dir), split
        manifest = read_manifest(self.shard_dir)
        paths = shard_paths(self.shard_dir, split)
        shards = manifest["splits"][split]["shards"]
        tok, st = manifest["tokenizer"], manifest["settings"]
        counts = np.asarray([int(sh["samples"]) for sh in shards], np.int64)
        names = [sh["name"] for sh in shards]
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.seed, self.num_workers, self.shuffle, self.loop = seed, num_workers, shuffle, loop
        self.dynamic_masking, self.block_shards = dynamic_masking, block_shards
        self.prefetch_factor, self.timeout_s, self.global_batch = prefetch_factor, timeout_s, global_batch
        self._plan = OrderPlan(names=names, paths=paths, counts=counts, rank=rank, world_size=world_size,
                           micro_batch=micro_batch, seed=seed, shuffle=shuffle, loop=loop, block_shards=block_shards,
                           global_batch=global_batch)
        if self._plan.T == 0:
            raise ValueError(f"{self.shard_dir}: split {split!r} has {self._plan.N} samples, fewer than one step "
                             f"of {global_batch if loop else micro_batch * world_size} samples")
        self._settings = {
            "max_seq_len": int(st["max_seq_len"]), "max_predictions": int(st["max_predictions"]),
            "masked_lm_prob": float(st.get("masked_lm_prob", 0.15)), "vocab_size": int(tok["vocab_size"]),
            "pad_id": int(tok["pad_id"]), "cls_id": int(tok["cls_id"]), "sep_id": int(tok["sep_id"]),
            "mask_id": int(tok["mask_id"]), "dynamic_masking": dynamic_masking, "limits": sample_limits(manifest),
        }
        self.pad_id = self._settings["pad_id"]
        self.max_predictions = self._settings["max_predictions"]
        self._digest = hashlib.sha1(
            "\n".join(f"{n}:{c}" for n, c in zip(names, counts.tolist())).encode()).hexdigest()
        self._q0 = 0  # stream position where the current (or next) iteration starts
        self._next_k = 0  # micro batches yielded since then
        self._resume_pending = False
        # what this rank's iterations found (since this loader was made): positions reached, corrupt and missing
        # samples among them, the shards its workers opened and those found damaged (name -> found, expected)
        self._read = self._missing = 0
        self._corrupt: dict[str, int] = {}  # shard -> corrupt samples
        self._opened: dict[str, int] = {}
        self._damaged: dict[str, dict] = {}

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
            self._q0, self._next_k = 0, 0  # every eval pass starts at the beginning unless a state was loaded
        self._resume_pending = False
        self._q0, self._next_k = self.position, 0
        stream = _Stream(self._plan, self._q0, self._settings)
        if self.num_workers == 0:
            source: Any = iter(stream)
        else:
            # Own generator: starting workers draws their base seed from it, not from the global RNG, so
            # creating an iterator never shifts the dropout stream (resume restores it in any order).
            source = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                     persistent_workers=False, prefetch_factor=self.prefetch_factor,
                                     collate_fn=_identity, worker_init_fn=WorkerSignals(),
                                     multiprocessing_context=worker_context(), timeout=_POLL_S,
                                     generator=torch.Generator().manual_seed(self.seed)))
            source = self._bounded(source)
        return self._consume(source)

    @property
    def position(self) -> int:
        """Logical position of the next sample this loader yields: samples handed out so far, all ranks together
        (the stream position too while nothing is skipped)."""
        return self._q0 + self._next_k * self.micro_batch * self.world_size

    @property
    def skips(self) -> list[tuple[int, int]]:
        """The stream ranges [start, end) this loader passes over (in global stream positions)."""
        return [tuple(r) for r in self._plan.skips.tolist()]

    def stream_position(self, logical: int) -> int:
        """The stream position of logical position ``logical`` under the current skips."""
        return int(self._plan.to_stream(np.int64(logical)))

    @property
    def samples_per_epoch(self) -> int:
        """Samples an epoch trains (training: whole global batches of the split; eval: all of it)."""
        return self._plan.used

    def ids_at(self, logical) -> np.ndarray:
        """The global sample ids (manifest order) at logical positions ``logical`` under the current skips,
        from the plan alone: what batches carry as ``ids`` (trainer.audit checks runs against it)."""
        epoch, pos = np.divmod(self._plan.to_stream(np.asarray(logical, np.int64)), self._plan.used)
        ids = np.empty_like(pos)
        for e in np.unique(epoch).tolist():
            ids[epoch == e] = self._plan.sample_ids(e, pos[epoch == e])
        return ids

    def stream_of(self, sd: dict) -> int:
        """The stream position a state (``state_dict()``) continues at."""
        return int(sd["epoch"]) * self._plan.used + int(sd["sample_in_epoch"])

    def skip(self, ranges) -> None:
        """Also pass over the stream ranges ``ranges`` ([start, end) each, global stream positions, so any world
        size means the same samples); merged with those already skipped. Takes effect from the next iteration,
        at the same logical position; a range behind it moves nothing (rewind with load_state_dict first)."""
        if not self.loop and ranges:
            raise ValueError("only a training (loop) loader skips ranges")
        self._plan.skips = merge_ranges(self.skips + [tuple(r) for r in ranges])

    def _bounded(self, source: Iterator[dict]) -> Iterator[dict]:
        """Batches of the DataLoader, waiting at most ``timeout_s`` for each. The DataLoader's own timeout is
        _POLL_S, so a dead worker is reported within seconds (torch checks liveness when a wait ends empty);
        a short wait ending is retried (its iterator state is unchanged) until the bound."""
        waited = 0.0
        while True:
            try:
                batch = next(source)
            except StopIteration:
                return
            except RuntimeError as e:
                if not str(e).startswith("DataLoader timed out"):
                    raise
                waited += _POLL_S
                if waited >= self.timeout_s:
                    raise DataError(f"{self.shard_dir} split {self.split!r}: no batch from the DataLoader workers of "
                                    f"rank {self.rank} for {waited:.0f}s (a worker hangs or the storage stalls); "
                                    f"the bound is data loader timeout_s={self.timeout_s:g}") from None
                continue
            waited = 0.0
            yield batch

    def _consume(self, source: Iterator[dict]) -> Iterator[dict]:
        for batch in source:
            k = batch.pop("_k")
            if k != self._next_k:
                raise RuntimeError(f"loader order broken: got micro batch {k}, expected {self._next_k}")
            self._next_k = k + 1
            self._read += int(batch.pop("_read"))
            self._missing += int(batch.pop("_missing"))
            self._opened.update(batch.pop("_opened"))
            for name, problem, found, expected in batch.pop("_bad_shards"):
                if name not in self._damaged:  # every worker reading it finds it: say it once
                    log.warning("shard %s: %s; its missing samples are skipped", name, problem)
                    self._damaged[name] = {"problem": problem, "found": found, "expected": expected}
            for name, note in batch.pop("_notes"):
                self._corrupt[name] = self._corrupt.get(name, 0) + 1
                log.warning("%s", note)
            for key in MODEL_INPUT_KEYS:
                batch[key] = torch.from_numpy(batch[key])
            yield batch

    # --- stats and state ---------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """This rank's counts since the loader was made: corrupt and missing samples among its positions, and the
        damaged shards its workers found (names)."""
        return {"corrupt_samples": sum(self._corrupt.values()), "missing_samples": self._missing,
                "bad_shards": len(self._damaged), "bad_shard_names": sorted(self._damaged)}

    def recheck(self, names: list[str]) -> dict[str, list[str]]:
        """A full check (data.shards.verify_shard) of those of ``names`` that are in this split: name -> its
        problems, empty when the shard is sound now (replaced since it was found damaged)."""
        m = read_manifest(self.shard_dir)
        entries = {sh["name"]: (p, sh) for p, sh in zip(shard_paths(self.shard_dir, self.split),
                                                         m["splits"][self.split]["shards"])}
        limits = sample_limits(m)
        return {n: verify_shard(*entries[n], limits)["problems"] for n in names if n in entries}

    def health_report(self) -> dict:
        """What data.health.DataHealth adds up over the ranks: positions reached, corrupt and missing samples,
        shards opened (name -> samples) and damaged (name -> problem, found, expected)."""
        return {"read": self._read, "corrupt": dict(self._corrupt), "missing": self._missing,
                "opened": dict(self._opened), "damaged": {k: dict(v) for k, v in self._damaged.items()}}

    def state_dict(self) -> dict:
        """``epoch``/``sample_in_epoch``: the stream position of the next sample; ``skips``: the ranges passed
        over (the order is a pure function of seed, epoch, manifest and these)."""
        epoch, sample_in_epoch = (divmod(self.stream_position(self.position), self._plan.used) if self.loop
                                  else (0, self.position))
        return {
            "skips": [list(r) for r in self.skips],
            "version": STATE_VERSION,
            "epoch": epoch,
            "sample_in_epoch": sample_in_epoch,  # global samples (all ranks) consumed in this epoch
            "samples_seen": self.position,
            "seed": self.seed, "world_size": self.world_size, "micro_batch": self.micro_batch,
            "global_batch": self.global_batch,
            "shuffle": self.shuffle, "loop": self.loop, "block_shards": self.block_shards,
            "dynamic_masking": self.dynamic_masking, "split": self.split,
            "num_samples": self._plan.N, "shards_digest": self._digest,
        }

    def load_state_dict(self, sd: dict) -> str:
        """Continue where ``sd`` (any rank's state: the position is global) stopped. World size and micro batch
        may differ: with the same global batch the stream continues exactly at the same sample; with another
        one, at the same sample of the same epoch (each epoch still uses whole global batches). Returns a note
        for the log when the global batch changed, else ""."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r}, this code reads {STATE_VERSION}")
        mine = self.state_dict()
        for k in ("seed", "shuffle", "loop", "block_shards", "dynamic_masking", "split", "num_samples",
                  "shards_digest"):
            if sd.get(k) != mine[k]:
                raise ValueError(f"cannot resume the data position exactly: {k} is {sd.get(k)!r} in the checkpoint "
                                 f"but {mine[k]!r} now ({self.shard_dir}, split {self.split!r})")
        epoch, sie = int(sd["epoch"]), int(sd["sample_in_epoch"])
        if epoch < 0 or not 0 <= sie <= self._plan.N:
            raise ValueError(f"loader state epoch={epoch} sample_in_epoch={sie} is outside a split of "
                             f"{self._plan.N} samples")
        old_batch = int(sd.get("global_batch") or sd["micro_batch"] * sd["world_size"])
        note = ""
        if old_batch != self.global_batch:
            note = (f"the global batch changed from {old_batch} to {self.global_batch} sequences per step: the data "
                    f"continues at sample {sie} of epoch {epoch}, but the steps hold other samples than they "
                    f"would have")
        if self.loop and sie >= self._plan.used:  # an epoch of whole new global batches ends earlier
            epoch, sie = epoch + 1, 0
        self._plan.skips = merge_ranges([tuple(r) for r in sd.get("skips", ())])  # none before skips existed
        self._q0 = int(self._plan.to_logical(np.int64(epoch * self._plan.used + sie))[0]) if self.loop else sie
        self._next_k = 0
        self._resume_pending = True
        return note
