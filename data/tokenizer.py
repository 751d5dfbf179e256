"""BERT WordPiece tokenizer: train one, load one, identify it by a fingerprint.

Train::

    python -m data.tokenizer --input corpus.txt --input hf:wikimedia/wikipedia:20231101.en \
        --out runs/tok [--vocab-size 30522]

Load (everywhere a tokenizer is taken): ``load_tokenizer(path)`` accepts a folder holding
``tokenizer.json`` or ``vocab.txt`` (e.g. Google's bert-base-uncased vocabulary), or either file.
Special-token ids are read from the vocabulary, never assumed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from common import files
from common.errors import DataError, run_main
from common.tokenizer_spec import lowercases

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first => pad id 0
META_FILE = "tokenizer_meta.json"


def _build_pipeline(tok: Tokenizer, lowercase: bool) -> None:
    # Same components as transformers' BertTokenizerFast (strip_accents=None => follows lowercase).
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


@dataclass
class BertTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ids BERT code needs."""

    tokenizer: Tokenizer
    vocab: list[str] = field(repr=False)
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, source: str = "<memory>") -> BertTokenizer:
        vocab_map = tok.get_vocab(with_added_tokens=True)
        n = len(vocab_map)
        vocab: list[str | None] = [None] * n
        for t, i in vocab_map.items():
            if not 0 <= i < n or vocab[i] is not None:
                raise DataError(f"{source}: vocabulary ids are not contiguous 0..{n - 1}")
            vocab[i] = t
        ids = {}
        for name, t in zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_TOKENS):
            i = vocab_map.get(t)
            if i is None:
                raise DataError(f"{source}: special token {t} is missing from the vocabulary")
            ids[name + "_id"] = i
        # Never emit [CLS]/[SEP] when we encode raw corpus sentences: the builder adds them itself.
        return cls(tokenizer=tok, vocab=vocab, fingerprint=_fingerprint(tok, vocab), **ids)  # type: ignore[arg-type]

    # -- conversions ------------------------------------------------------------------------------
    def id_to_token(self, i: int) -> str:
        return self.vocab[int(i)]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        v = self.vocab
        return [v[int(i)] for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """WordPiece ids of each text, without special tokens (batch, Rust side)."""
        enc = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in enc(texts, add_special_tokens=False)]

    def encode_pair(
        self, text_a: str, text_b: str | None = None, max_length: int = 512
    ) -> tuple[list[int], list[int]]:
        """``[CLS] A [SEP] (B [SEP])`` ids and token_type_ids, longest-first truncation from the end."""
        a = self.tokenizer.encode(text_a, add_special_tokens=False).ids
        b = self.tokenizer.encode(text_b, add_special_tokens=False).ids if text_b is not None else None
        budget = max_length - (3 if b is not None else 2)
        if budget < 0:
            raise ValueError(f"max_length={max_length} leaves no room for special tokens")
        if b is None:
            a = a[:budget]
        else:
            na, nb = len(a), len(b)
            if na + nb > budget:  # longest-first exactly as the Rust tokenizers (HF fast) do it
                half = budget // 2
                if na <= half:
                    nb = budget - na
                elif nb <= half:
                    na = budget - nb
                else:
                    na, nb = half, budget - half
            a, b = a[:na], b[:nb]
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write tokenizer.json, vocab.txt (one token per line, id order) and tokenizer_meta.json."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
        files.write_text(os.path.join(directory, "vocab.txt"), "".join(t + "\n" for t in self.vocab))
        files.write_text(os.path.join(directory, META_FILE), json.dumps(self.meta(), indent=2) + "\n")

    def meta(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "cls_id": self.cls_id,
            "sep_id": self.sep_id,
            "mask_id": self.mask_id,
            "lowercase": self.lowercase,
        }

    @property
    def lowercase(self) -> bool:
        return lowercases(json.loads(self.tokenizer.to_str()).get("normalizer"))




def _fingerprint(tok: Tokenizer, vocab: list[str]) -> str:
    """Stable hash of what decides the ids: vocabulary, normaliser, pre-tokenizer, WordPiece params."""
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    desc = {
        "vocab": vocab,
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "model": {k: model.get(k) for k in ("type", "unk_token", "continuing_subword_prefix",
                                             "max_input_chars_per_word")},
    }
    blob = json.dumps(desc, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_vocab_txt(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            toks = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: vocab.txt is not UTF-8 ({e.reason} at byte {e.start})") from None
    while toks and toks[-1] == "":
        toks.pop()
    if not toks:
        raise DataError(f"{path}: vocab.txt is empty")
    seen: set[str] = set()
    for n, t in enumerate(toks, 1):
        if t in seen:
            raise DataError(f"{path}: line {n}: duplicate token {t!r}")
        seen.add(t)
    return toks


def _guess_lowercase(vocab: list[str]) -> bool:
    """A cased vocabulary (e.g. bert-base-cased) holds many tokens with capitals; uncased has none."""
    caps = sum(1 for t in vocab if not (t.startswith("[") and t.endswith("]")) and t != t.lower())
    return caps < max(10, len(vocab) // 100)


def from_vocab_txt(path: str, lowercase: bool | None = None) -> BertTokenizer:
    vocab = _read_vocab_txt(path)
    if lowercase is None:
        lowercase = _guess_lowercase(vocab)
    return _from_vocab_list(vocab, lowercase, path)


def _from_vocab_list(vocab: list[str], lowercase: bool, path: str) -> BertTokenizer:
    if "[UNK]" not in vocab:
        raise DataError(f"{path}: special token [UNK] is missing from the vocabulary")
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    _build_pipeline(tok, lowercase)
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
    bt = BertTokenizer.from_tokenizer(tok, path)
    _set_post_processor(bt)
    return bt


def _set_post_processor(bt: BertTokenizer) -> None:
    bt.tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", bt.cls_id), ("[SEP]", bt.sep_id)],
    )


def load_tokenizer(path: str, lowercase: bool | None = None) -> BertTokenizer:
    """Load from a folder (tokenizer.json preferred, else vocab.txt) or from either file.

    ``lowercase`` only matters for a bare vocab.txt (tokenizer.json carries its normaliser); by
    default it is guessed from the vocabulary (no capitalised tokens => uncased).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), lowercase)
        raise DataError(f"{path}: folder holds neither tokenizer.json nor vocab.txt")
    if not os.path.exists(path):
        raise DataError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise DataError(f"{path}: not a valid tokenizers JSON file ({e})") from None
        if (json.loads(tok.to_str()).get("model") or {}).get("type") != "WordPiece":
            raise DataError(f"{path}: not a WordPiece tokenizer")
        return BertTokenizer.from_tokenizer(tok, path)
    return from_vocab_txt(path, lowercase)


def train_tokenizer(
    sentences: Iterable[str], vocab_size: int = 30522, min_frequency: int = 2,
    lowercase: bool = True, show_progress: bool = True,
) -> BertTokenizer:
    """Train a BERT WordPiece tokenizer ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    _build_pipeline(tok, lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##", show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(sentences), trainer=trainer)
    # The trainer's token *set* is deterministic but its id order is not (hash-map iteration):
    # renumber canonically (specials first, then by length and text) so a retrain is byte-identical.
    rest = [t for t in tok.get_vocab() if t not in SPECIAL_TOKENS]
    rest.sort(key=lambda t: (t.startswith("##"), len(t), t))
    return _from_vocab_list(list(SPECIAL_TOKENS) + rest, lowercase, "<trained>")


def _batched(it: Iterable[str], n: int = 1000) -> Iterator[list[str]]:
    buf: list[str] = []
    for s in it:
        buf.append(s)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _main(argv: list[str] | None = None) -> int:
    from data.corpus import CorpusOptions, add_corpus_args, iter_corpus_sentences

    p = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--out", required=True, help="output folder (tokenizer.json, vocab.txt)")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on at most this many sentences (a sample of a huge corpus)")
    a = p.parse_args(argv)
    if a.vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"--vocab-size {a.vocab_size} is too small")
    opts = CorpusOptions.from_args(a)
    t0 = time.time()
    stats: dict = {}
    sents = iter_corpus_sentences(opts, stats=stats, limit=a.max_sentences)
    bt = train_tokenizer(sents, vocab_size=a.vocab_size, min_frequency=a.min_frequency,
                         lowercase=not a.cased, show_progress=sys.stderr.isatty())
    bt.save(a.out)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.items())
                        if k not in ("files", "sentences", "documents", "wiki_pages")) or "none"
    print(f"tokenizer: vocab {bt.vocab_size}, fingerprint {bt.fingerprint}, "
          f"{stats.get('sentences', 0)} sentences from {stats.get('documents', 0)} documents, "
          f"skipped/repaired: {skipped}; {time.time() - t0:.1f}s -> {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
