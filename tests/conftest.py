"""Shared fixtures. data/ tests: fixtures prefixed ``data_`` (session-scoped, built once)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_BUILD_KW = dict(max_seq_len=128, max_predictions=20, dupe_factor=3, valid_fraction=0.05,
                     shard_size=1500, block_docs=200, seed=7, progress=False)


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory):
    """A real-text Google-format corpus: stdlib docstrings (deterministic, offline)."""
    from data.corpus import python_docs_corpus

    path = str(tmp_path_factory.mktemp("data_corpus") / "pydocs.txt")
    n = python_docs_corpus(path, max_docs=1200)
    assert n == 1200
    return path


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory, data_corpus):
    """A small WordPiece tokenizer (vocab 2000) trained on data_corpus; returns its folder."""
    from data.corpus import CorpusOptions, iter_corpus_sentences
    from data.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("data_tok"))
    tok = train_tokenizer(iter_corpus_sentences(CorpusOptions([data_corpus])), vocab_size=2000,
                          show_progress=False)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def data_build_kw():
    return dict(DATA_BUILD_KW)


@pytest.fixture(scope="session")
def data_built(tmp_path_factory, data_corpus, data_tokenizer):
    """data_corpus built with DATA_BUILD_KW, workers=1; returns the shard folder."""
    from data.build import build

    out = str(tmp_path_factory.mktemp("data_built") / "shards")
    build([data_corpus], data_tokenizer, out, workers=1, **DATA_BUILD_KW)
    return out
