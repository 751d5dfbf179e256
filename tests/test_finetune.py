"""Fine-tuning: task data handling (units) and launcher/finetune.py end to end on a tiny pretrained run.

The learnable task: sentences of filler words with one sentiment word inserted at a random place; the label
is which sentiment list the word came from. A classifier must find the word anywhere in the sequence, which
a tiny BERT does in a few epochs (a majority-class guess scores ~50%).
"""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import CPU_PRECISION, base_env
from trainer.dist import free_port
from trainer.errors import FinetuneError
from trainer.finetune_task import (Columns, collate, dev_batches, encode_split, load_classifier, load_local_task,
                                   train_batches)
from trainer.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
FINETUNE = str(REPO / "launcher" / "finetune.py")
FILLER = ("the a function returns value list string object module class method file path name number data "
          "argument default error type").split()
POSITIVE, NEGATIVE = ["excellent", "great", "good"], ["terrible", "awful", "bad"]


def synthetic(n, seed, pair=False):
    """Rows (text, [text_b], label): the label is decided by which sentiment word the (second) text holds."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 10))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        if pair:  # the first text is uninformative filler: the signal is in segment B only
            rows.append({"text": " ".join(rng.choice(FILLER) for _ in range(6)), "text_b": " ".join(words),
                         "label": label})
        else:
            rows.append({"text": " ".join(words), "label": label})
    return rows


def write(path, rows):
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".tsv":  # GLUE style: tab-separated, quotes left as they are
        path.write_text("".join("\t".join(r) + "\n" for r in [list(rows[0])] + [list(r.values()) for r in rows]))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return str(path)


def ds_config(tmp, micro=16):
    ds = json.loads((REPO / "ds_configs" / "finetune.json").read_text())
    ds.pop("train_batch_size")  # micro x accum 1 x ranks, whatever the rank count
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1)
    path = Path(tmp) / f"finetune_{micro}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def run_finetune(*args, expect=0):
    p = subprocess.run([sys.executable, FINETUNE, *map(str, args)], capture_output=True, text=True, env=base_env(),
                       timeout=400)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-5000:]}"
    return p


@torch.no_grad()
def accuracy(model, tokenizer, split, max_len=64):
    enc = encode_split(tokenizer, split, max_len)
    batch = collate(enc, list(range(len(enc))), tokenizer.pad_id)
    labels = batch.pop("labels")
    return (model(**batch).argmax(-1) == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Units: task files, labels, batching


def test_local_task_labels_are_deterministic_and_numeric_aware(tmp_path):
    train = write(tmp_path / "t.csv", [{"text": f"x {i}", "label": str(lab)} for i, lab in enumerate([10, 2, 0, 2])])
    dev = write(tmp_path / "d.csv", [{"text": "y", "label": "10"}, {"text": "z", "label": "0"}])
    task = load_local_task(train, dev, Columns())
    assert task.label_names == ["0", "2", "10"]  # numeric order, not "0" < "10" < "2"
    assert task.train.labels == [2, 1, 0, 1] and task.dev.labels == [2, 0]
    assert not task.paired
    words = write(tmp_path / "w.csv", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"},
                                       {"text": "c", "label": "neg"}])
    assert load_local_task(words, words, Columns()).label_names == ["neg", "pos"]


def test_local_task_errors_name_file_row_and_columns(tmp_path):
    good = write(tmp_path / "good.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    bad_col = write(tmp_path / "badcol.csv", [{"sentence": "a", "label": "x"}])
    with pytest.raises(FinetuneError, match=r"badcol.csv: no column 'text' \(columns: \['sentence', 'label'\]\)"):
        load_local_task(bad_col, good, Columns())
    unseen = write(tmp_path / "unseen.csv", [{"text": "a", "label": "z"}])
    with pytest.raises(FinetuneError, match=r"unseen.csv: labels \['z'\] do not occur"):
        load_local_task(good, unseen, Columns())
    empty = write(tmp_path / "empty.csv", [{"text": "a", "label": "x"}, {"text": " ", "label": "y"}])
    with pytest.raises(FinetuneError, match=r"empty.csv: row 3: column 'text' is empty"):
        load_local_task(empty, good, Columns())
    with pytest.raises(FinetuneError, match="given by --text-b-column"):
        load_local_task(good, good, Columns(text_b="second", text_b_explicit=True))
    (tmp_path / "x.txt").write_text("text,label\na,x\n")
    with pytest.raises(FinetuneError, match=r"x.txt: unknown file type '.txt'"):
        load_local_task(str(tmp_path / "x.txt"), good, Columns())


def test_tsv_keeps_quotes_and_jsonl_pairs(tmp_path, train_shards):
    from data.tokenizer import load_tokenizer

    rows = [{"text": 'he said "hi', "text_b": "b one", "label": "1"}, {"text": "x", "text_b": "y", "label": "0"}]
    tsv = write(tmp_path / "p.tsv", rows)
    jsonl = write(tmp_path / "p.jsonl", rows)
    for path in (tsv, jsonl):
        task = load_local_task(path, path, Columns())
        assert task.paired and task.train.text_a[0] == 'he said "hi' and task.train.text_b == ["b one", "y"]
    tok = load_tokenizer(os.path.join(train_shards, "tokenizer"))
    enc = encode_split(tok, task.train, 16)
    batch = collate(enc, [0, 1], tok.pad_id)
    assert batch["input_ids"].shape[1] % 8 == 0
    for r in range(2):
        n = int(batch["attention_mask"][r].sum())
        types = batch["token_type_ids"][r, :n].tolist()
        assert types[0] == 0 and types[-1] == 1 and types == sorted(types)  # [CLS] A [SEP] then B [SEP]
        assert (batch["input_ids"][r, n:] == tok.pad_id).all()


@pytest.mark.parametrize("n,world,micro", [(100, 1, 16), (101, 2, 8), (7, 3, 2)])
def test_batches_cover_every_example(n, world, micro):
    per_rank = [train_batches(n, micro, r, world, seed=5, epoch=1) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    seen = [i for b in per_rank for batch in b for i in batch]
    assert set(seen) == set(range(n)) and len(seen) == -(-n // world) * world
    assert train_batches(n, micro, 0, world, 5, 1) != train_batches(n, micro, 0, world, 5, 2)  # reshuffled
    dev = [dev_batches(n, micro, r, world) for r in range(world)]
    assert len({len(d) for d in dev}) == 1
    real = [i for d in dev for idx, mask in d for i, m in zip(idx, mask) if m]
    assert sorted(real) == list(range(n))  # every dev example counted exactly once


def test_epoch_loader_pads_epochs_to_whole_steps_and_resumes_at_any_batch():
    """Each epoch is padded to whole optimizer steps (26 examples, micro 4, accumulation 3: 7 micro-batches + 2
    padding = 3 steps); a loader restored from the position after any micro-batch yields exactly the rest of
    the stream (the next epochs reshuffled as in the uninterrupted one); another rank count is refused."""
    from trainer.finetune import EpochLoader
    from trainer.finetune_task import Encoded

    enc = Encoded([[2, 5 + i % 50, 3] for i in range(26)], [[0, 0, 0]] * 26, [i % 2 for i in range(26)])

    def take(loader, n):
        it = iter(loader)
        return [(b["keys"], b["is_padding"], b["input_ids"].tolist()) for b in (next(it) for _ in range(n))]

    ref = EpochLoader(enc, 4, 3, rank=0, world=1, seed=5, pad_id=0)
    stream = take(ref, 22)
    assert ref.steps_per_epoch == 3
    assert [pad for _, pad, _ in stream[:9]] == [False] * 7 + [True] * 2
    assert sorted(k for keys, _, _ in stream[:9] for k in keys) == list(range(26))
    assert [k for k, _, _ in stream[:9]] != [k for k, _, _ in stream[9:18]]  # epoch 2 is another permutation
    for cut in (0, 4, 8, 9, 13):
        first = EpochLoader(enc, 4, 3, 0, 1, 5, 0)
        take(first, cut)
        again = EpochLoader(enc, 4, 3, 0, 1, 5, 0)
        again.load_state_dict(first.state_dict())
        assert take(again, 22 - cut) == stream[cut:], cut
    with pytest.raises(ValueError, match=r"resume fine-tuning on 1 rank\(s\)"):
        EpochLoader(enc, 4, 3, 0, 2, 5, 0).load_state_dict(ref.state_dict())


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_task")
    return {"train": write(tmp / "train.csv", synthetic(320, 1)), "dev": write(tmp / "dev.csv", synthetic(100, 2)),
            "ptrain": write(tmp / "ptrain.jsonl", synthetic(320, 3, pair=True)),
            "pdev": write(tmp / "pdev.jsonl", synthetic(100, 4, pair=True))}


@pytest.mark.integration
def test_finetune_learns_the_task_saves_best_and_exports_hf(eval_run, task_files, tmp_path):
    out = tmp_path / "ft"
    p = run_finetune("--deepspeed", ds_config(tmp_path), "--model", eval_run, "--train", task_files["train"],
                     "--dev", task_files["dev"], "--lr", "1e-3", "--epochs", "3", "--max-len", "64",
                     "--export-hf", "--out", out)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["best_dev_accuracy"] > 0.9, p.stdout + p.stderr[-3000:]
    run = summary["runs"][0]
    assert len(run["dev_accuracy"]) == 3 and summary["best_dev_accuracy"] == max(run["dev_accuracy"])
    assert run["batch_size"] == 16 and run["steps"] == 3 * (320 // 16)
    assert f"fp16 -> {CPU_PRECISION}" in p.stderr  # fp16 in finetune.json switched on CPU, as in pretraining
    assert "best" in p.stdout and "ep3" in p.stdout  # the final table

    recs = read_records(out / "metrics.jsonl")
    epochs = [r for r in recs if "dev/accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert [r["dev/accuracy"] for r in epochs] == run["dev_accuracy"]
    assert recs[-1]["best/dev_accuracy"] == summary["best_dev_accuracy"]
    # Linear warmup (10% of 60 steps = 6) then linear decay: the last update used lr_at(59) = peak / 54.
    from trainer.schedule import lr_at
    assert epochs[-1]["total_steps"] == 60 and epochs[-1]["warmup_steps"] == 6
    assert epochs[-1]["lr"] == pytest.approx(lr_at(59, 1e-3, 6, 60)) == pytest.approx(1e-3 / 54)
    assert epochs[0]["lr"] == pytest.approx(lr_at(19, 1e-3, 6, 60))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))

    # The saved best model reproduces the reported best dev accuracy (same examples; fp32 here vs the bf16
    # engine during training, so a borderline example or two may flip: 0.02 = 2 of 100).
    model, tok, info = load_classifier(str(out / "best"))
    assert info["labels"] == ["negative", "positive"] and info["epoch"] == summary["best_epoch"]
    task = load_local_task(task_files["train"], task_files["dev"], Columns())
    assert accuracy(model, tok, task.dev) == pytest.approx(summary["best_dev_accuracy"], abs=0.02)

    transformers = pytest.importorskip("transformers")
    hf, loading = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "best_hf"),
                                                                                  output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert hf.config.num_labels == 2 and hf.config.id2label == {0: "negative", 1: "positive"}
    hf.eval()
    enc = encode_split(tok, task.dev, 64)
    batch = collate(enc, list(range(20)), tok.pad_id)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(model(**batch), hf(**batch).logits, atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out / "best_hf"))
    assert hf_tok(task.dev.text_a[0])["input_ids"] == tok.encode_pair(task.dev.text_a[0], max_length=64)[0]


@pytest.mark.integration
def test_finetune_sentence_pairs(eval_run, task_files, tmp_path):
    out = tmp_path / "pair"
    p = run_finetune("--deepspeed", ds_config(tmp_path), "--model", eval_run, "--train", task_files["ptrain"],
                     "--dev", task_files["pdev"], "--lr", "1e-3", "--epochs", "3", "--max-len", "64", "--out", out)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["best_dev_accuracy"] > 0.9, p.stdout + p.stderr[-3000:]
    _model, _tok, info = load_classifier(str(out / "best"))
    assert info["paired"] is True


def test_two_ranks_count_every_dev_example_once(eval_run, task_files, tmp_path, procs):
    out = tmp_path / "two"
    p = procs.run([Path(sys.executable).parent / "deepspeed", "--num_gpus", "2", "--master_port", free_port(),
                   FINETUNE, "--deepspeed", ds_config(tmp_path), "--model", eval_run, "--train", task_files["train"],
                   "--dev", task_files["dev"], "--lr", "1e-3", "--epochs", "2", "--max-len", "64", "--out", out],
                  tmp_path / "two", env=base_env(), timeout=400)
    # The deepspeed launcher adds its own log lines after the ranks' output: take our JSON line.
    summary = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('{"task"')][-1])
    run = summary["runs"][0]
    assert run["batch_size"] == 32  # micro 16 x 2 ranks
    assert run["steps"] == 2 * (160 // 16)  # 320 examples / 2 ranks = 160 per rank per epoch
    epochs = [r for r in read_records(out / "metrics.jsonl") if "dev/accuracy" in r]
    assert [r["dev/examples"] for r in epochs] == [100, 100]  # disjoint shards, padding not counted
    model, tok, info = load_classifier(str(out / "best"))
    task = load_local_task(task_files["train"], task_files["dev"], Columns())
    assert accuracy(model, tok, task.dev) == pytest.approx(summary["best_dev_accuracy"], abs=0.02)


SWEEP_ARGS = ("--sweep", "--epochs", "2", "--max-len", "32", "train.log_every=1")  # 10 steps per epoch
FT_STOP_PROBE = '''"""launcher/finetune.py sending itself a SIGTERM as step FT_STOP_STEP of run FT_STOP_RUN starts."""
import os, runpy, signal, sys
from trainer import trainer

real = trainer.Trainer.train_step


def train_step(self, batches):
    here = os.path.basename(self.cfg.output_dir), self.step
    if here == (os.environ["FT_STOP_RUN"], int(os.environ["FT_STOP_STEP"])):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, batches)


trainer.Trainer.train_step = train_step
sys.argv[0] = os.environ["FT_SCRIPT"]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def sweep_args(tmp, task_files, eval_run, out):
    return ["--deepspeed", ds_config(tmp, micro=32), "--model", eval_run, "--train", task_files["train"], "--dev",
            task_files["dev"], *SWEEP_ARGS, "--out", out]


@pytest.fixture(scope="module")
def sweep(eval_run, task_files, tmp_path_factory):
    """An uninterrupted sweep (3 learning rates, 2 epochs of 10 steps each, a log line per step)."""
    tmp = tmp_path_factory.mktemp("sweep")
    p = run_finetune(*sweep_args(tmp, task_files, eval_run, tmp / "sweep"))
    return p, tmp / "sweep"


def sweep_steps(out):
    """lr folder -> step -> (loss, lr, accuracy, keys) of the loop's log lines."""
    return {run.name: {r["step"]: (r["loss"], r["lr"], r["accuracy"], r["keys"])
                       for r in read_records(run / "metrics.jsonl") if "loss" in r} for run in sorted(out.glob("lr_*"))}


@pytest.mark.integration
def test_sweep_runs_three_learning_rates_and_picks_the_best(sweep):
    p, out = sweep
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r["lr"] for r in summary["runs"]] == [5e-5, 3e-5, 2e-5]
    best = max(summary["runs"], key=lambda r: r["best"])
    assert summary["best_lr"] == best["lr"] and summary["best_dev_accuracy"] == best["best"]
    for r in summary["runs"]:
        assert Path(r["out"]).name == f"lr_{r['lr']:g}" and r["steps"] == 20
        assert (Path(r["out"]) / "best" / "model.safetensors").is_file()
        assert not (Path(r["out"]) / "checkpoints").exists()  # a finished run keeps its result, not its optimizer
        dev = [x for x in read_records(Path(r["out"]) / "metrics.jsonl") if "dev/accuracy" in x]
        assert [x["lr_peak"] for x in dev] == [r["lr"]] * 2 and [x["epoch"] for x in dev] == [1, 2]
    assert summary == json.loads((out / "summary.json").read_text())
    assert p.stdout.count("e-05") >= 3  # one table row per learning rate
    assert all(len(steps) == 20 for steps in sweep_steps(out).values())  # train.log_every=1: a line per step


@pytest.mark.integration
def test_a_sweep_stopped_mid_run_resumes_exactly(sweep, eval_run, task_files, tmp_path):
    """SIGTERM during the second run's second epoch: that run saves its step and the sweep exits 0; the same
    command skips the finished run, resumes the stopped one at its step and runs the last. Per-step losses,
    lrs, training accuracy and batches, the dev metrics and the best models equal the uninterrupted sweep's."""
    from safetensors.torch import load_file

    _, ref = sweep
    out = tmp_path / "sweep"
    args = sweep_args(tmp_path, task_files, eval_run, out)
    (tmp_path / "ft_stop.py").write_text(FT_STOP_PROBE)
    env = base_env(FT_STOP_RUN="lr_3e-05", FT_STOP_STEP="13", FT_SCRIPT=FINETUNE,
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(tmp_path / "ft_stop.py"), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "SIGTERM from pid" in p.stderr and "stop requested" in p.stderr, p.stderr[-3000:]
    stopped = int((out / "lr_3e-05" / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 13 < stopped < 20, stopped  # mid-epoch 2
    assert (out / "lr_5e-05" / "result.json").is_file() and not (out / "lr_2e-05").exists()

    p = run_finetune(*args)
    assert "lr_5e-05: finished earlier" in p.stderr and f"resumed from {out / 'lr_3e-05'}" in p.stderr, p.stderr[-3000:]
    got, want = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    for r in (*got["runs"], *want["runs"]):
        r.pop("out")
    assert got["runs"] == want["runs"] and got["best_lr"] == want["best_lr"]
    assert sweep_steps(out) == sweep_steps(ref)
    for run in ("lr_5e-05", "lr_3e-05", "lr_2e-05"):
        dev = [[r[k] for k in ("step", "train/loss", "dev/accuracy", "dev/loss")]
               for folder in (out, ref) for r in read_records(folder / run / "metrics.jsonl") if "dev/accuracy" in r]
        assert dev[:2] == dev[2:], run
        a, b = (load_file(folder / run / "best" / "model.safetensors") for folder in (out, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


@pytest.mark.integration
def test_tokenizer_mismatch_and_too_long_max_len_are_refused(eval_run, train_shards_other_tok, task_files, tmp_path):
    other = os.path.join(train_shards_other_tok, "tokenizer")
    p = run_finetune("--deepspeed", ds_config(tmp_path), "--model", eval_run, "--tokenizer", other,
                     "--train", task_files["train"], "--dev", task_files["dev"], "--out", tmp_path / "x", expect=2)
    from data.tokenizer import load_tokenizer

    fp_run = load_tokenizer(os.path.join(eval_run, "tokenizer")).fingerprint
    fp_other = load_tokenizer(other).fingerprint
    assert "tokenizer mismatch" in p.stderr and fp_run in p.stderr and fp_other in p.stderr
    assert "--allow-tokenizer-mismatch" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
    # Explicitly allowed: it runs, warns, and the saved model records both fingerprints.
    p = run_finetune("--deepspeed", ds_config(tmp_path, micro=32), "--model", eval_run, "--tokenizer", other,
                     "--allow-tokenizer-mismatch", "--train", task_files["train"], "--dev", task_files["dev"],
                     "--epochs", "1", "--max-len", "32", "--out", tmp_path / "z")
    assert "warning: tokenizer mismatch" in p.stderr
    _m, _t, info = load_classifier(str(tmp_path / "z" / "best"))
    assert info["tokenizer_fingerprint"] == fp_other and info["pretraining_tokenizer_fingerprint"] == fp_run
    # The tiny run has 64 positions: the default --max-len 128 is refused up front, not mid-training.
    p = run_finetune("--deepspeed", ds_config(tmp_path), "--model", eval_run, "--train", task_files["train"],
                     "--dev", task_files["dev"], "--out", tmp_path / "y", expect=2)
    assert "--max-len 128 exceeds the model's max_position_embeddings 64" in p.stderr


@pytest.mark.integration
def test_hf_dir_model_carries_the_pretraining_fingerprint(eval_run, train_shards_other_tok, tmp_path):
    """An exported HF dir whose tokenizer files were swapped is refused (tokenizer_config.json records the
    pretraining fingerprint); the untouched export loads with the same fingerprint as the run."""
    import shutil

    from trainer.checkpoint_read import load_pretrained
    from trainer.errors import CheckpointError

    hf = tmp_path / "hf"
    subprocess.run([sys.executable, str(REPO / "launcher" / "export_hf.py"), "--checkpoint", eval_run, "--out",
                    str(hf)], check=True, capture_output=True, timeout=300)
    _m, tok, meta = load_pretrained(str(hf))
    assert meta.kind == "hf" and meta.fingerprint_recorded
    assert meta.tokenizer_fingerprint == tok.fingerprint == load_run_fingerprint(eval_run)
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(os.path.join(train_shards_other_tok, "tokenizer", name), hf / name)
    with pytest.raises(CheckpointError, match="records the pretraining tokenizer"):
        load_pretrained(str(hf))


def load_run_fingerprint(run_dir):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(run_dir, "tokenizer")).fingerprint
