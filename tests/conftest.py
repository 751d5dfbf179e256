"""Shared fixtures. data/ tests: fixtures prefixed ``data_`` (session-scoped, built once). Processes that
tests start go through ``procs`` (helpers.Procs): on a timeout or at the end of the test, their whole process
groups are killed and the test fails with the tail of each log."""

import os

import pytest

from data.build import BuildSettings
from helpers import Procs
from trainer.dist import pin_extensions_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pin_extensions_dir()  # DeepSpeed's JIT ops live in this venv, as for every launcher; subprocesses inherit it

DATA_BUILD = BuildSettings(max_seq_len=128, max_predictions=20, dupe_factor=3, valid_fraction=0.05,
                           shard_size=1500, block_docs=200, seed=7)


# Fixtures that start real processes (launchers, ranks, Slurm daemons). A test that needs one, directly or
# through another fixture (pytest's closure of a test's fixtures), is an integration test; tests that start
# a process themselves carry the marker explicitly. `pytest -m "not integration"` is the fast unit set.
PROCESS_FIXTURES = {"procs", "session_procs", "slurm", "slurm_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _signal_mask_restored():
    """A test that runs a Trainer in this process holds the stop signals (trainer.guards): give the mask back,
    so that processes later tests start (which inherit it through fork and exec) can be stopped."""
    import signal

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture
def procs():
    """Start processes in their own process groups; all are killed when the test ends (helpers.Procs)."""
    p = Procs()
    yield p
    p.kill_all()


@pytest.fixture(scope="session")
def session_procs():
    p = Procs()
    yield p
    p.kill_all()


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
def data_build_settings():
    return DATA_BUILD


@pytest.fixture(scope="session")
def data_built(tmp_path_factory, data_corpus, data_tokenizer):
    """data_corpus built with DATA_BUILD_KW, workers=1; returns the shard folder."""
    from data.build import build

    out = str(tmp_path_factory.mktemp("data_built") / "shards")
    build([data_corpus], data_tokenizer, out, DATA_BUILD, workers=1, progress=False)
    return out


# --- trainer fixtures ---
# Tiny real-text shards for the training-loop tests (tests/test_train*.py): a vocab-1000 tokenizer and
# seq-64 shards from the stdlib docstrings, built once per session (~2 s).
TRAIN_SEQ_LEN = 64


def _train_build(root, max_docs, seq_len, vocab_size=1000, tok_docs=None, tokenizer_dir=None):
    from data.build import build
    from data.corpus import CorpusOptions, iter_corpus_sentences, python_docs_corpus
    from data.tokenizer import train_tokenizer

    corpus = str(root / "corpus.txt")
    python_docs_corpus(corpus, max_docs=max_docs)
    tok_corpus = corpus
    if tok_docs is not None:  # a different tokenizer: trained on another slice of the docs
        tok_corpus = str(root / "tok_corpus.txt")
        python_docs_corpus(tok_corpus, max_docs=tok_docs)
    if tokenizer_dir is not None:  # reuse: WordPiece training breaks count ties in hash order, so a
        tok_dir = tokenizer_dir    # retrain of the same corpus may differ in a few tokens (another fingerprint)
    else:
        tok = train_tokenizer(iter_corpus_sentences(CorpusOptions([tok_corpus])), vocab_size=vocab_size,
                              show_progress=False)
        tok_dir = str(root / "tokenizer")
        tok.save(tok_dir)
    out = str(root / "shards")
    build([corpus], tok_dir, out, BuildSettings(max_seq_len=seq_len, max_predictions=max(2, seq_len * 15 // 100),
                                                dupe_factor=2, valid_fraction=0.1, shard_size=300, block_docs=100,
                                                seed=3), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """Shard folder (train + valid splits, manifest, tokenizer/) at seq 64, vocab 1000."""
    return _train_build(tmp_path_factory.mktemp("train_shards"), max_docs=400, seq_len=TRAIN_SEQ_LEN)


@pytest.fixture(scope="session")
def train_shards_128(tmp_path_factory, train_shards):
    """Same documents and the same tokenizer at seq 128 (a 'phase 2' set for init_from)."""
    import os
    return _train_build(tmp_path_factory.mktemp("train_shards_p2"), max_docs=400, seq_len=128,
                        tokenizer_dir=os.path.join(train_shards, "tokenizer"))


@pytest.fixture(scope="session")
def train_shards_other_tok(tmp_path_factory):
    """Shards whose tokenizer has the same vocab size but different contents (another fingerprint)."""
    return _train_build(tmp_path_factory.mktemp("train_shards_tok2"), max_docs=400, seq_len=TRAIN_SEQ_LEN,
                        tok_docs=900)
# --- end trainer fixtures ---


# --- eval fixtures ---
# Tiny pretraining runs made by the real launcher (launcher/pretrain.py) on the trainer's train_shards, for
# tests/test_eval_export.py and tests/test_finetune.py: one process ZeRO-2 with fp16 (-> bf16 on CPU), and
# `deepspeed --num_gpus 2` ZeRO-2 in fp32 (a checkpoint partitioned over 2 ranks), one process ZeRO-3 bf16
# (parameters partitioned too). 8 steps each (~10-30 s on 2 cores). Validation runs over the
# whole valid split at the end, so evaluate.py has logged numbers to match.
def _eval_pretrain(procs, tmp, shards, out, world, fp16, ds_name="zero2.json", stage=None):
    import sys
    from pathlib import Path

    from helpers import REPO, base_env, write_ds, write_run
    from trainer.dist import free_port

    ds = write_ds(tmp, ds_name, micro=8, lr=2e-3, fp16=fp16, stage=stage)
    cfg = write_run(tmp, shards, out, model={"max_position_embeddings": 64}, data={"num_workers": 0}, seed=11,
                    max_steps=8, warmup_steps=2, log_every=4, eval_every=8, eval_batches=None, save_every=8)
    script = [REPO / "launcher" / "pretrain.py", "--deepspeed", ds, "--config", cfg]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [Path(sys.executable).parent / "deepspeed", "--num_gpus", world, "--master_port", free_port(), *script]
    p = procs.run(cmd, Path(tmp) / "launcher", env=base_env(), timeout=400)
    (Path(tmp) / "launcher_stdout.txt").write_text(p.stdout)
    return str(out)


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, train_shards, session_procs):
    """Run directory of a 1-process ZeRO-2 bf16 pretraining run (8 steps, checkpoint step_0000008)."""
    tmp = tmp_path_factory.mktemp("eval_run")
    return _eval_pretrain(session_procs, tmp, train_shards, tmp / "run", world=1, fp16=True)


@pytest.fixture(scope="session")
def eval_run_2rank(tmp_path_factory, train_shards, session_procs):
    """Run directory of a 2-rank (`deepspeed --num_gpus 2`) ZeRO-2 fp32 pretraining run."""
    tmp = tmp_path_factory.mktemp("eval_run_2rank")
    return _eval_pretrain(session_procs, tmp, train_shards, tmp / "run", world=2, fp16=False)


@pytest.fixture(scope="session")
def eval_run_zero3(tmp_path_factory, train_shards, session_procs):
    """Run directory of a 1-process ZeRO-3 bf16 pretraining run (parameters partitioned in the checkpoint)."""
    tmp = tmp_path_factory.mktemp("eval_run_zero3")
    return _eval_pretrain(session_procs, tmp, train_shards, tmp / "run", world=1, fp16=True, ds_name="zero3.json")


@pytest.fixture(scope="session")
def eval_run_zero0(tmp_path_factory, train_shards, session_procs):
    """Run directory of a 1-process stage-0 bf16 run: no ZeRO files, fp32 masters inside the optimizer state."""
    tmp = tmp_path_factory.mktemp("eval_run_zero0")
    return _eval_pretrain(session_procs, tmp, train_shards, tmp / "run", world=1, fp16=True, stage=0)
# --- end eval fixtures ---
