"""launcher/evaluate.py and launcher/export_hf.py on checkpoints written by the real pretraining launcher.

Oracles: the run's own logged validation (metrics.jsonl `val/*`), transformers' BertForPreTraining /
BertTokenizerFast reading the export (strict: no missing/unexpected keys), and the checkpoint's own bf16
module weights (the fp32 consolidation rounded to bf16 must give them back).
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import load_tokenizer
from helpers import CPU_PRECISION
from trainer.checkpoint_files import read_model_states
from trainer.checkpoint_read import _check_against_module, load_run
from trainer.errors import CheckpointError
from trainer.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
EVALUATE = str(REPO / "launcher" / "evaluate.py")
EXPORT = str(REPO / "launcher" / "export_hf.py")
METRICS = ("mlm_loss", "perplexity", "mlm_acc", "nsp_loss", "nsp_acc")


def run_cli(script, *args, expect=0):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-4000:]}"
    return p


def last_validation(run_dir):
    vals = [r for r in read_records(Path(run_dir, "metrics.jsonl")) if "val/mlm_loss" in r]
    assert vals, "the run logged no validation"
    return vals[-1]


def evaluate_json(run_dir, data, *args):
    p = run_cli(EVALUATE, "--checkpoint", run_dir, "--data", data, *args)
    return json.loads(p.stdout.strip().splitlines()[-1]), p


@pytest.mark.integration  # builds its training run on demand (getfixturevalue)
@pytest.mark.parametrize("fixture", ["eval_run", "eval_run_2rank", "eval_run_zero3", "eval_run_zero0"])
def test_evaluate_equals_the_runs_logged_validation(request, fixture, train_shards):
    run_dir = request.getfixturevalue(fixture)
    logged = last_validation(run_dir)
    result, p = evaluate_json(run_dir, train_shards)
    assert result["step"] == logged["step"] == 8
    assert result["samples"] == logged["val/samples"] and result["predictions"] == logged["val/predictions"]
    assert result["samples"] == json.loads(Path(train_shards, "manifest.json").read_text())["splits"]["valid"]["samples"]
    # Same code, same batches, same precision: only float64 summation order differs across ranks. Under
    # ZeRO-3 DeepSpeed swaps nn.Linear's function for its own (matmul, then `+= bias`, instead of one fused
    # addmm on 3-D inputs), which rounds differently in bf16: losses agree to ~1e-4 there (perplexity =
    # exp(loss) to ~1e-4 * loss), and an argmax may flip: accuracies within 2 predictions.
    for k in METRICS:
        if fixture != "eval_run_zero3":
            assert result[k] == pytest.approx(logged[f"val/{k}"], rel=1e-9, abs=1e-12), k
        elif k.endswith("_acc"):
            n = result["predictions"] if k == "mlm_acc" else result["samples"]
            assert abs(result[k] - logged[f"val/{k}"]) <= 2 / n, k
        else:
            assert result[k] == pytest.approx(logged[f"val/{k}"], rel=1e-3), k
    assert "mlm_loss" in p.stdout and "perplexity" in p.stdout  # the table
    if fixture == "eval_run_zero3":  # parameters partitioned: the module file holds placeholders only
        assert glob.glob(os.path.join(run_dir, "checkpoints", "step_0000008", "zero_pp_rank_0_*model_states.pt"))
    expected_ranks = 2 if fixture == "eval_run_2rank" else 1
    assert result["ranks"] == expected_ranks
    assert result["dtype"] == ("fp32" if fixture == "eval_run_2rank" else CPU_PRECISION)


def test_two_rank_checkpoint_is_partitioned_and_reading_as_one_rank_agrees(eval_run_2rank, train_shards):
    ckpt = Path(eval_run_2rank, "checkpoints", "step_0000008")
    assert len(glob.glob(str(ckpt / "*zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-2 over 2 ranks
    logged = last_validation(eval_run_2rank)
    one, _ = evaluate_json(eval_run_2rank, train_shards, "--ranks", "1")
    assert one["ranks"] == 1 and one["samples"] == logged["val/samples"]
    # Different batch composition (padding lengths) in fp32: equal up to float rounding, not bit-exact.
    for k in METRICS:
        assert one[k] == pytest.approx(logged[f"val/{k}"], rel=1e-4), k


def test_evaluate_refuses_other_tokenizer_and_sequence_length(eval_run, train_shards, train_shards_other_tok,
                                                             tmp_path):
    mine = load_tokenizer(os.path.join(eval_run, "tokenizer")).fingerprint
    other = json.loads(Path(train_shards_other_tok, "manifest.json").read_text())["tokenizer"]["fingerprint"]
    assert mine != other
    p = run_cli(EVALUATE, "--checkpoint", eval_run, "--data", train_shards_other_tok, expect=2)
    assert "tokenizer mismatch" in p.stderr and mine in p.stderr and other in p.stderr
    assert "Traceback" not in p.stderr
    # Same tokenizer (the run's own), built at seq 128 instead of the run's 64.
    from data.build import BuildSettings, build

    long_shards = str(tmp_path / "shards128")
    build([str(Path(train_shards).parent / "corpus.txt")], os.path.join(eval_run, "tokenizer"), long_shards,
          BuildSettings(max_seq_len=128, max_predictions=20, dupe_factor=1, valid_fraction=0.1, shard_size=300,
                        block_docs=100, seed=3), workers=1, progress=False)
    p = run_cli(EVALUATE, "--checkpoint", eval_run, "--data", long_shards, expect=2)
    assert "sequence length mismatch" in p.stderr and "max_seq_len 128" in p.stderr and "max_seq_len 64" in p.stderr


def test_bad_tag_names_available_tags(eval_run, train_shards):
    p = run_cli(EVALUATE, "--checkpoint", eval_run, "--tag", "step_9999999", "--data", train_shards, expect=2)
    assert "step_9999999" in p.stderr and "step_0000008" in p.stderr


@pytest.mark.integration  # builds its training run on demand (getfixturevalue)
@pytest.mark.parametrize("fixture", ["eval_run", "eval_run_zero0"])
def test_consolidation_returns_fp32_masters_not_upcast_bf16(request, fixture):
    if CPU_PRECISION != "bf16":
        pytest.skip("this CPU has no native bf16, so the runs train in fp32 and hold no bf16 module copy "
                    "(fp32 consolidation: eval_run_2rank's tests)")
    model, _tok, meta = load_run(request.getfixturevalue(fixture))
    assert meta.eval_dtype() == "bf16" and meta.tag == "step_0000008"
    # ZeRO-2: DeepSpeed's merge; stage 0: the bf16 optimizer's flat fp32 groups (decay / no-decay), each
    # parameter attributed to its group by matching the saved bf16 module weights.
    assert ("zero_to_fp32" if fixture == "eval_run" else "fp32 master") in meta.consolidation
    states = read_model_states(meta.checkpoint_dir)
    sd = {k: v for k, v in model.state_dict().items()}
    w = sd["bert.encoder.layer.0.attention.self.query.weight"]
    assert w.dtype == torch.float32
    # Trained fp32 masters carry bits bf16 cannot hold; an upcast bf16 module copy would not.
    assert (w.to(torch.bfloat16).float() != w).float().mean() > 0.5
    _check_against_module(sd, states, meta.checkpoint_dir)  # rounds back to the saved bf16 module exactly
    # ...and the check is not vacuous: two same-shaped tensors swapped are caught.
    a, b = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.key.weight"
    swapped = dict(sd, **{a: sd[b], b: sd[a]})
    with pytest.raises(CheckpointError, match="disagree"):
        _check_against_module(swapped, states, meta.checkpoint_dir)


def test_export_from_zero3_checkpoint(eval_run_zero3, tmp_path):
    out = tmp_path / "hf3"
    p = run_cli(EXPORT, "--checkpoint", eval_run_zero3, "--out", out)
    assert "read-back logits identical" in p.stdout and "zero_to_fp32" in p.stdout
    from bert.hf import from_hf

    ours, _tok, _meta = load_run(eval_run_zero3)
    back = from_hf(str(out))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.fixture(scope="module")
def exported(eval_run_2rank, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    p = run_cli(EXPORT, "--checkpoint", eval_run_2rank, "--out", out)
    assert "read-back logits identical" in p.stdout
    return out


def test_export_files_and_transformers_strict_load_same_logits(exported, eval_run_2rank):
    transformers = pytest.importorskip("transformers")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= set(os.listdir(exported))
    hf, info = transformers.AutoModelForPreTraining.from_pretrained(str(exported), output_loading_info=True)
    assert type(hf).__name__ == "BertForPreTraining"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    hf.eval()
    ours, tok, meta = load_run(eval_run_2rank)
    assert json.loads((exported / "tokenizer_config.json").read_text())["bert_fingerprint"] == meta.tokenizer_fingerprint

    pairs = [("The module returns a list of strings.", "Each item is a path."),
             ("Raise ValueError if the argument is negative.", "Otherwise return None."),
             ("Short.", "A somewhat longer second sentence with more words in it.")]
    enc = [tok.encode_pair(a, b, max_length=64) for a, b in pairs]
    S = max(len(i) for i, _ in enc)
    ids = torch.zeros(len(enc), S, dtype=torch.long)  # (B, S) padded with [PAD] = 0
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for r, (i, t) in enumerate(enc):
        ids[r, :len(i)], types[r, :len(t)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(t), 1
    with torch.no_grad():
        a = ours(ids, types, mask)
        b = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()  # padded positions are not compared: both models leave them unconstrained
    assert torch.allclose(a.prediction_logits[real], b.prediction_logits[real], atol=1e-5, rtol=0)
    assert torch.allclose(a.seq_relationship_logits, b.seq_relationship_logits, atol=1e-5, rtol=0)


def test_export_tokenizer_ids_equal_autotokenizer(exported, train_shards):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    ours = load_tokenizer(os.path.join(train_shards, "tokenizer"))
    corpus = Path(train_shards).parent / "corpus.txt"
    lines = [ln.strip() for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()][:300]
    lines += ["Héllo Wörld — UNUSUAL tokens: naïve café, 3.14159, x_y_z!", "日本語 text and emoji 🙂"]
    assert len(lines) > 100
    # Whole texts: the ids come from the same vocabulary, normaliser and WordPiece in both. (Truncation is
    # a policy, not a tokenizer property: ours is Google's pop-from-the-longer, which gives the odd token of
    # an odd budget to A on ties, where transformers' longest_first gives it to the originally longer text.)
    for a, b in zip(lines, lines[1:] + lines[:1]):
        for pair in ((a, None), (a, b)):
            ids, types = ours.encode_pair(*pair, max_length=100_000)
            enc = hf_tok(*[t for t in pair if t is not None], truncation=False)
            assert enc["input_ids"] == ids, pair
            assert enc["token_type_ids"] == types, pair
