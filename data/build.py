"""Build WebDataset shards of prebuilt BERT pretraining examples (Google's create_pretraining_data).

    python -m data.build --input corpus/ --tokenizer runs/tok --out shards/phase1 \
        [--max-seq-len 128 --max-predictions 20 --masked-lm-prob 0.15 --short-seq-prob 0.1
         --dupe-factor 5 --whole-word-mask --seed 12345 --workers N --valid-fraction 0.01
         --shard-size 10000 --block-docs 1000 --num-slices N --slice-index I]

Streaming and parallel with bounded memory: documents are cut, in input order, into blocks of at most
``--block-docs`` documents / ``--block-chars`` characters. Each block is one task: sentence splitting,
tokenisation, the algorithm (every dupe pass, random-next partners drawn from the same block and split),
masking, a shuffle of the block's instances and the binary encoding all happen in a worker, with RNGs
seeded from (seed, block index, split, pass). Results are written in block order, so the output is
byte-identical whatever ``--workers`` is. Memory is bounded by (workers + prefetch) blocks.

Validation = whole documents whose content hash falls under ``--valid-fraction``; their instances and
random-next partners come only from validation documents.

``--num-slices N --slice-index I`` builds only blocks with ``index % N == I`` (a deterministic, disjoint
subset of documents) into its own folder; ``python -m data.merge OUT PART...`` joins the parts. Because
seeds derive from global block indices, a merged build holds exactly the examples of the parts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from data import shards
from data.corpus import (STREAMS, CorpusOptions, RawDoc, add_corpus_args, expand_raw, iter_raw_documents,
                         prepare_document, resolve_spec)
from data.wikidump import SKIPS as WIKI_SKIPS
from common import files
from common.errors import DataError, run_main
from data.pretraining import Params, create_instances, derive_seed, mask_instances
from data.tokenizer import BertTokenizer, load_tokenizer

DEFAULT_SHARD_SIZE = 10000
DEFAULT_BLOCK_DOCS = 1000
DEFAULT_BLOCK_CHARS = 8_000_000
SKIP_REASONS = ("empty_documents", "empty_sentences", "headings_dropped", "records_without_text",
                "empty_inputs", *WIKI_SKIPS)
_SHARD_RE = re.compile(r"^(train|valid)-\d+\.tar(\.tmp)?$")

# ---------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------
_W: dict = {}  # per-process worker state: tokenizer and settings (set once by _init_worker)


def _init_worker(tokenizer_json: str, params: Params, valid_fraction: float, corpus: dict,
                 in_pool: bool = False) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: measure per-core honestly
    if in_pool:  # Ctrl-C is handled once, by the main process (no traceback per worker)
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Pool.terminate() ends workers with SIGTERM: a parent that holds its stop signals (a training
        # launcher's mask is inherited through fork) must not leave them unkillable.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    from tokenizers import Tokenizer

    tok = BertTokenizer.from_tokenizer(Tokenizer.from_str(tokenizer_json))
    # Corpus text that spells "[SEP]" or "[MASK]" is text, not a special token (as in Google's
    # tokenizer, which never matches special tokens inside raw text).
    tok.tokenizer.encode_special_tokens = True
    cont = np.fromiter((t.startswith("##") for t in tok.vocab), bool, tok.vocab_size)
    _W.update(tok=tok, params=params, valid_fraction=valid_fraction, corpus=corpus, is_cont=cont,
              id_code=shards.id_dtype_code(tok.vocab_size),
              pos_code=shards.pos_dtype_code(params.max_seq_len))


def is_valid_document(sentences: list[str], valid_fraction: float) -> bool:
    """Deterministic held-out choice from the document's content (independent of order and slicing)."""
    if valid_fraction <= 0:
        return False
    h = hashlib.blake2b("\n".join(sentences).encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < valid_fraction


def _encode_split(block: int, split: str, insts, masked, id_code: int, pos_code: int):
    """Tar members of one split of a block: one contiguous blob + per-member sizes and token counts."""
    ids, offs, pos, poffs, labels = masked.ids, masked.offsets, masked.pos, masked.pos_offsets, masked.labels
    idt = (np.uint8, np.uint16, np.uint32)[id_code]
    ids_b = ids.astype(idt)
    labels_b = labels.astype(idt)
    pos_b = pos.astype((np.uint8, np.uint16)[pos_code])
    parts, sizes = [], []
    enc, member = shards.encode_record, shards.tar_member
    letter = split[0]
    offs_l, poffs_l = offs.tolist(), poffs.tolist()
    for i, (sep, nsp) in enumerate(zip(insts.sep_index, insts.is_random_next)):
        a, b, pa, pb = offs_l[i], offs_l[i + 1], poffs_l[i], poffs_l[i + 1]
        rec = enc(ids_b[a:b], sep, pos_b[pa:pb], labels_b[pa:pb], nsp, id_code, pos_code)
        m = member(f"b{block:08d}-{letter}{i:06d}.{shards.SAMPLE_EXT}", rec)
        parts.append(m)
        sizes.append(len(m))
    return b"".join(parts), sizes, np.diff(offs).tolist()


def process_block(task: tuple[int, list[RawDoc]]) -> dict:
    """One block: raw documents -> encoded tar members per split, plus counters."""
    t0 = time.process_time()
    block, raws = task
    tok: BertTokenizer = _W["tok"]
    p: Params = _W["params"]
    c = _W["corpus"]
    stats: dict = collections.Counter()
    raws = expand_raw(raws, stats)  # a multistream dump's streams are decompressed here, by their worker
    # 1. sentences, split assignment
    docs_s: list[list[str]] = []
    is_valid: list[bool] = []
    for raw in raws:
        sents = prepare_document(raw, c["max_line_chars"], c["drop_headings"], stats)
        docs_s.append(sents)
        is_valid.append(is_valid_document(sents, _W["valid_fraction"]))
    # 2. tokenise the whole block in one batch; drop sentences that tokenise to nothing
    flat = [s for d in docs_s for s in d]
    ids = tok.encode_ids(flat) if flat else []
    pools: dict[str, list] = {"train": [], "valid": []}
    k = 0
    for sents, val in zip(docs_s, is_valid):
        segs = [x for x in ids[k:k + len(sents)] if x]
        stats["empty_sentences"] += len(sents) - len(segs)
        k += len(sents)
        if not segs:
            stats["empty_documents"] += 1
            continue
        if len(segs) == 1:
            stats["one_sentence_documents"] += 1
        stats["sentences"] += len(segs)
        stats["input_tokens"] += sum(map(len, segs))
        pools["valid" if val else "train"].append(segs)
    out: dict = {"block": block}
    for split, docs in pools.items():
        stats[f"{split}_documents"] += len(docs)
        if not docs:
            out[split] = (b"", [], [])
            continue
        seed_parts = (p.seed, block, split)
        insts = create_instances(docs, p, seed_parts, tok.cls_id, tok.sep_id, stats)
        masked = mask_instances(insts, p, np.random.default_rng(derive_seed(*seed_parts, "mask")),
                                tok.vocab_size, tok.cls_id, tok.sep_id, tok.mask_id, _W["is_cont"])
        stats["random_next"] += sum(insts.is_random_next)
        stats["masked_as_mask"] += masked.n_mask
        stats["masked_kept"] += masked.n_keep
        stats["masked_random"] += masked.n_random
        out[split] = _encode_split(block, split, insts, masked, _W["id_code"], _W["pos_code"])
    stats["documents"] = len(pools["train"]) + len(pools["valid"])
    out["stats"] = dict(stats)
    out["cpu"] = time.process_time() - t0
    return out


# ---------------------------------------------------------------------------------------------------
# Main side: blocks, ordered bounded parallelism, shard writing
# ---------------------------------------------------------------------------------------------------
def iter_blocks(raws: Iterable[RawDoc], block_docs: int, block_chars: int) -> Iterator[tuple[int, list]]:
    """Documents in input order -> (block index, documents). A STREAMS item (a range of a multistream dump,
    already sized to ``block_docs`` pages by the index) is a block of its own."""
    block: list[RawDoc] = []
    chars = 0
    index = 0
    for raw in raws:
        kind, payload = raw
        if kind == STREAMS:
            if block:
                yield index, block
                index += 1
                block, chars = [], 0
            yield index, [raw]
            index += 1
            continue
        block.append(raw)
        chars += len(payload) if isinstance(payload, str) else sum(map(len, payload))  # type: ignore
        if len(block) >= block_docs or chars >= block_chars:
            yield index, block
            index += 1
            block, chars = [], 0
    if block:
        yield index, block


def _ordered_bounded_map(fn, tasks: Iterable, workers: int, initargs: tuple, prefetch: int):
    """Like Pool.imap (ordered) but never holds more than workers + prefetch tasks in flight."""
    if workers <= 1:
        _init_worker(*initargs)
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(*initargs, True)) as pool:
        pending: collections.deque = collections.deque()
        for t in tasks:
            pending.append(pool.apply_async(fn, (t,)))
            if len(pending) >= workers + prefetch:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    """Writes ``{split}-NNNNNN.tar`` shards of ``shard_size`` members; ``.tmp`` until complete."""

    def __init__(self, out: str, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: list[dict] = []
        self.f = None
        self.count = self.tokens = 0

    def _path(self) -> str:
        return os.path.join(self.out, shards.shard_name(self.split, len(self.shards)))

    def add(self, blob: bytes, sizes: list[int], ntokens: list[int]) -> None:
        mv = memoryview(blob)
        off = 0
        i, n = 0, len(sizes)
        while i < n:
            if self.f is None:
                self.f = open(self._path() + ".tmp", "wb")
            take = min(self.shard_size - self.count, n - i)
            length = sum(sizes[i:i + take])
            self.f.write(mv[off:off + length])
            self.tokens += sum(ntokens[i:i + take])
            self.count += take
            off += length
            i += take
            if self.count >= self.shard_size:
                self.close_shard()

    def close_shard(self) -> None:
        if self.f is None:
            return
        self.f.write(shards.TAR_EOF)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        path = self._path()
        os.replace(path + ".tmp", path)
        self.shards.append({"name": os.path.basename(path), "samples": self.count, "tokens": self.tokens})
        self.count = self.tokens = 0

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            try:
                os.remove(self._path() + ".tmp")
            except OSError:
                pass

    def summary(self) -> dict:
        return {"shards": self.shards, "samples": sum(s["samples"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards)}


def _refuse_inputs_inside(out: str, inputs: list[str]) -> None:
    """An input (corpus file, tokenizer) inside the output folder would be deleted or overwritten by the build
    (its tokenizer/ is replaced, leftovers are cleared): refuse before anything is written."""
    root = os.path.realpath(out)
    for path in inputs:
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) == root:
            raise DataError(f"--out {out} holds the input {path}: the build would delete or overwrite it; "
                            f"choose an output folder that does not contain its inputs")


def _clean_out_dir(out: str) -> None:
    for name in os.listdir(out):
        if _SHARD_RE.match(name) or name in (shards.MANIFEST + ".tmp",):
            os.remove(os.path.join(out, name))
    if os.path.isdir(os.path.join(out, "tokenizer")):
        shutil.rmtree(os.path.join(out, "tokenizer"))


@dataclass(frozen=True)
class BuildSettings(Params):
    """What the examples are (Google's parameters, Params, and how they are cut into shards); recorded in the
    manifest: the same inputs, tokenizer and settings give the same bytes, whatever the worker count."""

    valid_fraction: float = 0.01
    shard_size: int = DEFAULT_SHARD_SIZE
    block_docs: int = DEFAULT_BLOCK_DOCS
    """Documents per work block = random-next pool and shuffle window."""
    block_chars: int = DEFAULT_BLOCK_CHARS
    """Also close a block at this many characters (bounds memory)."""
    num_slices: int = 1
    """Build only the blocks with index % num_slices == slice_index (python -m data.merge joins them)."""
    slice_index: int = 0

    def check(self) -> None:
        checks = [
            (5 <= self.max_seq_len <= 65535, f"--max-seq-len {self.max_seq_len} must be in 5..65535"),
            (self.max_predictions >= 1, f"--max-predictions {self.max_predictions} must be >= 1"),
            (0 < self.masked_lm_prob < 1, f"--masked-lm-prob {self.masked_lm_prob} must be in (0, 1)"),
            (0 <= self.short_seq_prob <= 1, f"--short-seq-prob {self.short_seq_prob} must be in [0, 1]"),
            (self.dupe_factor >= 1, f"--dupe-factor {self.dupe_factor} must be >= 1"),
            (0 <= self.valid_fraction < 1, f"--valid-fraction {self.valid_fraction} must be in [0, 1)"),
            (self.shard_size >= 1, f"--shard-size {self.shard_size} must be >= 1"),
            (self.block_docs >= 1 and self.block_chars >= 1, "--block-docs/--block-chars must be >= 1"),
            (self.num_slices >= 1 and 0 <= self.slice_index < self.num_slices,
             f"--slice-index {self.slice_index} must be in 0..{self.num_slices - 1}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DataError(msg)

    def manifest_settings(self, corpus: CorpusOptions) -> dict:
        s = dataclasses.asdict(self)
        order = ("max_seq_len", "max_predictions", "masked_lm_prob", "short_seq_prob", "dupe_factor",
                 "whole_word_mask", "seed", "valid_fraction", "shard_size")
        return {**{k: s[k] for k in order}, **corpus.settings(), "block_docs": self.block_docs,
                "block_chars": self.block_chars, "num_slices": self.num_slices, "slice_index": self.slice_index,
                "next_sentence_label": "1 = random next (Google)"}


def _prepare_out_dir(out: str, settings: dict, tok_meta: dict, overwrite: bool) -> dict | None:
    """Make ``out`` ready for a build; returns the manifest of an identical finished build (nothing to do)."""
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, shards.MANIFEST)
    if os.path.exists(mpath):
        try:
            old = shards.read_manifest(out)
        except DataError:
            old = None
        if old and old["settings"] == settings and old["tokenizer"] == tok_meta and not overwrite:
            print(f"{out}: already built with these settings and tokenizer; nothing to do", file=sys.stderr)
            return old
        if old is not None and not overwrite:
            raise DataError(f"{mpath}: the folder holds a different build; pass --overwrite or choose another --out")
        os.remove(mpath)  # (or it was unreadable) from here on the folder no longer looks complete
    _clean_out_dir(out)  # leftovers of an interrupted build: restart cleanly
    return None


def _write_blocks(results, writers: dict, pbar) -> tuple[collections.Counter, float]:
    """Write each block's encoded examples, in block order; returns the summed counters and worker CPU."""
    stats: collections.Counter = collections.Counter()
    cpu = 0.0
    for res in results:
        for s in shards.SPLITS:
            writers[s].add(*res[s])
        stats.update(res["stats"])
        stats["blocks"] += 1
        cpu += res["cpu"]
        if pbar is not None:
            pbar.update(res["stats"].get("documents", 0))
            pbar.set_postfix(examples=writers["train"].count + sum(x["samples"] for x in writers["train"].shards),
                             refresh=False)
    for w in writers.values():
        w.close_shard()
    return stats, cpu


def _manifest(tok_meta: dict, settings: dict, splits: dict, reader_stats, stats) -> dict:
    return {
        "format_version": shards.FORMAT_VERSION,
        "tokenizer": tok_meta,
        "settings": settings,
        "splits": splits,
        "stats": {
            "input": {"files": reader_stats["files"], "raw_documents": reader_stats["raw_documents"]},
            **{k: stats[k] for k in ("documents", "train_documents", "valid_documents", "one_sentence_documents",
                                     "sentences", "input_tokens", "blocks")},
            "examples": splits["train"]["samples"] + splits["valid"]["samples"],
            "tokens": splits["train"]["tokens"] + splits["valid"]["tokens"],
            **{k: stats[k] for k in ("random_next", "forced_random_next", "target_draws", "short_target_draws",
                                     "masked_as_mask", "masked_kept", "masked_random")},
            "wiki_pages": reader_stats["wiki_pages"] + stats["wiki_pages"],
            "skipped": {k: reader_stats[k] + stats[k] for k in SKIP_REASONS},
            "repaired": {k: reader_stats[k] + stats[k] for k in ("non_utf8_lines", "giant_lines_cut")},
        },
    }


def _write_shards(corpus: CorpusOptions, tok: BertTokenizer, settings: BuildSettings, out: str, workers: int,
                  progress: bool, reader_stats: collections.Counter) -> tuple[dict, dict, float]:
    """Read, build and write every block of this slice in ``workers`` processes, in order; returns the split
    writers, the summed statistics and the workers' CPU seconds. On any failure the shards in progress are
    abandoned (and, for bad input, the output folder emptied)."""
    def counted(it):
        for r in it:  # a STREAMS item counts the pages its index lists (every slice sees the whole index)
            reader_stats["raw_documents"] += r[1].pages if r[0] == STREAMS else 1
            yield r

    raws = iter_raw_documents(corpus, reader_stats, stream_block_pages=settings.block_docs)
    blocks = (b for b in iter_blocks(counted(raws), settings.block_docs, settings.block_chars)
              if b[0] % settings.num_slices == settings.slice_index)
    writers = {s: ShardWriter(out, s, settings.shard_size) for s in shards.SPLITS}
    initargs = (tok.tokenizer.to_str(), settings, settings.valid_fraction,
                {"max_line_chars": corpus.max_line_chars, "drop_headings": corpus.drop_headings})
    results = _ordered_bounded_map(process_block, blocks, workers, initargs, prefetch=2)
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(desc="build", unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        stats, cpu = _write_blocks(results, writers, pbar)
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, DataError):  # bad input: remove what was written, the user must fix it
            _clean_out_dir(out)
        raise
    finally:
        results.close()  # stops the worker pool now, also on errors
        if pbar is not None:
            pbar.close()
    return writers, stats, cpu


def _print_summary(out: str, manifest: dict, wall: float, workers: int, cpu: float) -> None:
    st, splits = manifest["stats"], manifest["splits"]
    skipped_s = ", ".join(f"{k} {v}" for k, v in {**st["skipped"], **st["repaired"]}.items() if v) or "none"
    print(f"built {out}: {st['documents']} documents ({st['valid_documents']} valid), "
          f"{st['examples']} examples (train {splits['train']['samples']}, valid "
          f"{splits['valid']['samples']}), {st['tokens']} tokens, skipped/repaired: {skipped_s}; "
          f"{wall:.1f}s wall, {st['tokens'] / max(wall, 1e-9) / workers:,.0f} tokens/s per worker core "
          f"({workers} workers; {st['tokens'] / max(cpu, 1e-9):,.0f} tokens/s per worker CPU-second)", file=sys.stderr)


def build(corpus: CorpusOptions | list[str] | str, tokenizer: str | BertTokenizer, out: str,
          settings: BuildSettings | None = None, *, workers: int | None = None, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Build shards of ``corpus`` (options, or input specs) into ``out``; returns the manifest (also written to
    ``out/manifest.json``, last: its presence means the build is complete)."""
    t_start = time.time()
    if not isinstance(corpus, CorpusOptions):
        corpus = CorpusOptions(inputs=[corpus] if isinstance(corpus, str) else list(corpus))
    settings = settings or BuildSettings()
    settings.check()
    tok = tokenizer if isinstance(tokenizer, BertTokenizer) else load_tokenizer(tokenizer)
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    manifest_settings, tok_meta = settings.manifest_settings(corpus), dict(tok.meta())
    # a missing input, or an input inside the output folder, fails before the output folder is touched
    _refuse_inputs_inside(out, [f for spec in corpus.inputs for r, f in resolve_spec(spec) if r != "hf"]
                          + ([] if isinstance(tokenizer, BertTokenizer) else [os.fspath(tokenizer)]))
    done = _prepare_out_dir(out, manifest_settings, tok_meta, overwrite)
    if done is not None:
        return done

    reader_stats: dict = collections.Counter()
    writers, stats, cpu = _write_shards(corpus, tok, settings, out, workers, progress, reader_stats)
    if reader_stats["raw_documents"] == 0 or (settings.num_slices == 1 and stats["documents"] == 0):
        _clean_out_dir(out)
        raise DataError(f"no documents with text in input(s): {', '.join(corpus.inputs)}")

    tok.save(os.path.join(out, "tokenizer"))
    splits = {s: writers[s].summary() for s in shards.SPLITS}
    manifest = _manifest(tok_meta, manifest_settings, splits, reader_stats, stats)
    mpath = os.path.join(out, shards.MANIFEST)
    shards.validate_manifest(manifest, mpath)
    files.write_json(mpath, manifest)  # written last: its presence means the build is complete

    _print_summary(out, manifest, time.time() - t_start, workers, cpu)
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="folder or tokenizer.json / vocab.txt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-predictions", type=int, default=20)
    p.add_argument("--masked-lm-prob", type=float, default=0.15)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--dupe-factor", type=int, default=5)
    p.add_argument("--whole-word-mask", action="store_true")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="held-out documents")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="examples per shard")
    p.add_argument("--block-docs", type=int, default=DEFAULT_BLOCK_DOCS,
                   help="documents per work block (= random-next pool and shuffle window)")
    p.add_argument("--block-chars", type=int, default=DEFAULT_BLOCK_CHARS,
                   help="also close a block at this many characters (bounds memory)")
    p.add_argument("--num-slices", type=int, default=1, help="build only 1/N of the blocks ...")
    p.add_argument("--slice-index", type=int, default=0, help="... those with index %% N == I")
    p.add_argument("--overwrite", action="store_true", help="replace a different finished build")
    p.add_argument("--no-progress", action="store_true")
    return p


def _main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = BuildSettings(**{f.name: getattr(a, f.name) for f in dataclasses.fields(BuildSettings)})
    build(CorpusOptions.from_args(a), a.tokenizer, a.out, settings, workers=a.workers, overwrite=a.overwrite,
          progress=not a.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
