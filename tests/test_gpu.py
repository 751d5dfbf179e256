"""The GPU path: what only a CUDA device runs (marked ``gpu``; skipped, with the reason, without one).

scripts/gpu_check.sh runs ``pytest -m gpu tests/test_gpu.py`` on the GPU machine. Each test takes seconds:
model parity with transformers in fp32, SDPA's flash / memory-efficient kernels against the math path on our
attention's own inputs, unpadded against padded loss and gradients, DeepSpeed's CUDA FusedAdam against torch's
AdamW, fp16 dynamic loss scaling (a forced overflow is skipped; at the minimum scale the collapse guard
stops the run, also through the launcher), and that none of trainer/cpu.py runs on a CUDA host.

The fp16 and host checks have CPU twins that run everywhere (not marked ``gpu``): fp16 forced on DeepSpeed's
CPU accelerator for the loss-scaling logic, and the host probe on a CPU host, where it must see every CPU
workaround; so a GPU result of "none seen" means the probe can see them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bert import BertConfig, BertForPreTraining, BertModel
from bert.model import sdpa_attention
from helpers import REPO, base_env, make_batch, tiny_config, write_ds, write_run
from trainer.metrics import read_records

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                                 "scripts/gpu_check.sh runs these on a GPU machine")
PROBE = REPO / "tests" / "gpu_probe.py"
CPU_LINES = ("host allocator:", "cpu host workarounds")  # what trainer/cpu.py makes a launcher log


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision (no TF32) for the parity tests."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def grad_mismatches(got: dict, ref: dict, rtol: float) -> dict:
    """Parameters whose gradients differ by more than rtol of the reference's norm (a tiny absolute floor:
    attention's key bias has a zero gradient in exact arithmetic, so only rounding noise is there)."""
    return {n: rel(got[n], r) for n, r in ref.items() if n in got and (got[n] - r).norm() > rtol * r.norm() + 1e-7}


def probe(*args, timeout=600) -> dict:
    p = subprocess.run([sys.executable, str(PROBE), *map(str, args)], env=base_env(), capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("PROBE "):])


# ---------------------------------------------------------------------------------------------------
# The model on CUDA


@pytest.mark.gpu
@needs_cuda
def test_model_matches_transformers_fp32_on_cuda(tmp_path, exact_fp32):
    """Same weights, same padded batch: logits (eval) and the pretraining loss and every gradient (train,
    dropout 0) equal transformers' BertForPreTraining with SDPA."""
    import transformers

    from bert.hf import to_hf

    cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ours = BertForPreTraining(cfg)
    with torch.no_grad():
        for p in ours.parameters():  # non-trivial biases and LayerNorms too
            p.add_(torch.randn_like(p) * 0.02)
    to_hf(ours, tmp_path)
    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path, attn_implementation="sdpa").cuda()
    ours = ours.cuda()
    b = {k: v.cuda() for k, v in make_batch(cfg, B=4, S=64, P=8).items()}
    ids, tt, mask = b["input_ids"], b["token_type_ids"], b["attention_mask"]

    ours.eval(), theirs.eval()
    with torch.no_grad():
        o, t = ours(ids, tt, mask), theirs(input_ids=ids, token_type_ids=tt, attention_mask=mask)
    real = mask.bool()
    assert rel(o.prediction_logits[real], t.prediction_logits[real]) < 1e-5
    assert rel(o.seq_relationship_logits, t.seq_relationship_logits) < 1e-5

    ours.train(), theirs.train()
    labels = torch.full_like(ids, -100)  # transformers' dense labels at our sparse positions
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(b["masked_lm_positions"])
    keep = b["masked_lm_weights"] > 0
    labels[rows[keep], b["masked_lm_positions"][keep]] = b["masked_lm_ids"][keep]
    loss_o = ours(**b).loss
    loss_t = theirs(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels,
                    next_sentence_label=b["next_sentence_label"]).loss
    assert rel(loss_o, loss_t) < 1e-5
    loss_o.backward(), loss_t.backward()
    got, ref = ({n: p.grad for n, p in m.named_parameters()} for m in (ours, theirs))
    assert len(set(got) & set(ref)) == len(got)  # every parameter compared (same names: bert/hf.py)
    assert grad_mismatches(got, ref, 1e-4) == {}


def _attention_inputs(dtype, padded: bool):
    """q, k, v and the mask exactly as our first attention layer hands them to its kernel (BERT-base
    shapes: 12 heads of 64, S = 128, autocast in ``dtype``); the mask is None without padding."""
    cfg = BertConfig.preset("base", vocab_size=1000, num_hidden_layers=1, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertModel(cfg).cuda().eval()
    seen = []

    def capture(q, k, v, mask, dropout_p):
        seen.append((q, k, v, mask))
        return sdpa_attention(q, k, v, mask, dropout_p)

    model.encoder.layer[0].attention.self.attend = capture
    b = make_batch(cfg, B=4, S=128, P=8)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        model(b["input_ids"].cuda(), b["token_type_ids"].cuda(), b["attention_mask"].cuda() if padded else None)
    return seen[0]


def _attend(backend, q, k, v, mask, grad_out):
    from torch.nn.attention import sdpa_kernel

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([backend]):
        out = sdpa_attention(q, k, v, mask, 0.0)
        out.backward(grad_out)
    return [out, q.grad, k.grad, v.grad]


def _default_kernel(q, k, v, mask) -> list[str]:
    """The aten kernels torch's own dispatch picks for our call (read from the profiler)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sdpa_attention(q, k, v, mask, 0.0)
    return sorted({e.key for e in prof.key_averages()
                   if "attention" in e.key and e.key != "aten::scaled_dot_product_attention"})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_sdpa_flash_and_memory_efficient_match_math(dtype, tol, record_property):
    """Flash and memory-efficient SDPA against the math path in float64, forward and backward, on our
    attention's inputs. Flash takes no arbitrary mask: with padding it must refuse (torch then picks another
    kernel) and the memory-efficient kernel carries the mask. What ran is recorded (junit property). The
    tolerances catch a wrong kernel (errors near 1), not rounding (~1e-3 in fp16, ~1e-2 in bf16)."""
    from torch.nn.attention import SDPBackend

    seen = {}
    for padded in (False, True):
        q, k, v, mask = _attention_inputs(dtype, padded)
        assert (mask is not None) == padded
        grad_out = torch.randn_like(q)
        ref = _attend(SDPBackend.MATH, q.double(), k.double(), v.double(), mask, grad_out.double())
        case = {"default": _default_kernel(q, k, v, mask)}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                got = _attend(backend, q, k, v, mask, grad_out)
            except RuntimeError as e:  # "No available kernel": this backend does not take these inputs
                case[backend.name] = f"refused: {str(e).splitlines()[0][:120]}"
                continue
            errs = [rel(g, r) for g, r in zip(got, ref)]
            case[backend.name] = {"out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3]}
            if backend != SDPBackend.CUDNN_ATTENTION:  # cuDNN's is recorded, not asserted (version-dependent)
                assert max(errs) < tol, (backend.name, padded, errs)
        seen["padded" if padded else "full"] = case
    record_property("sdpa", json.dumps(seen))
    print(json.dumps(seen, indent=1))
    assert isinstance(seen["full"]["FLASH_ATTENTION"], dict), seen["full"]  # flash ran without a mask
    assert all(isinstance(seen[case]["EFFICIENT_ATTENTION"], dict) for case in ("full", "padded")), seen


@pytest.mark.gpu
@needs_cuda
def test_unpadded_matches_padded_on_cuda(exact_fp32):
    """bert/padding.py on CUDA: the loss and every gradient equal the padded path's (fp32), and agree in fp16."""
    cfg = tiny_config(vocab_size=500, hidden_size=128, num_attention_heads=4, intermediate_size=256,
                      max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).cuda()
    b = {k: v.cuda() for k, v in make_batch(cfg, B=4, S=48, P=6).items()}
    assert not b["attention_mask"].bool().all()

    def run(unpad, dtype=None):
        model.unpad = unpad
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            loss = model(**b).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (lu, gu), (lp, gp) = run(True), run(False)
    assert rel(lu, lp) < 1e-6
    assert grad_mismatches(gu, gp, 1e-5) == {}
    (lu, _), (lp, _) = run(True, torch.float16), run(False, torch.float16)
    assert rel(lu, lp) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_fused_adam_cuda_matches_torch_adamw():
    """DeepSpeed's FusedAdam (the JIT-built CUDA multi_tensor_adam, AdamW mode, what zero*.json ask for)
    against torch.optim.AdamW with the same settings, over a few steps."""
    from deepspeed.ops.adam import FusedAdam

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1024, 1024), (4096,), (30, 7)]
    ours = [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    opts = [FusedAdam(ours, adam_w_mode=True, **kw), torch.optim.AdamW(ref, **kw)]
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for a, b in zip(ours, ref):
        assert a.is_cuda and rel(a.detach(), b.detach()) < 1e-6


# ---------------------------------------------------------------------------------------------------
# fp16 dynamic loss scaling (engine built as pretraining builds it, in a fresh process)


def _check_overflow_report(r: dict, device: str) -> None:
    assert (r["device"], r["precision"]) == (device, "fp16"), r
    steps = r["steps"]
    assert [s["overflow"] for s in steps] == [False, True, True, False]
    assert [s["skipped_steps"] for s in steps] == [0, 1, 2, 2]  # the poisoned steps are skipped ...
    assert [s["weights_changed"] for s in steps] == [True, False, False, True]  # ... and change nothing
    # zero2.json: initial_scale_power 16, hysteresis 2: the first overflow uses up hysteresis, the second halves
    assert [s["loss_scale"] for s in steps] == [2.0 ** 16, 2.0 ** 16, 2.0 ** 15, 2.0 ** 15]
    at_min = r["at_min_scale"]  # scale pinned at min_loss_scale 1: DeepSpeed keeps skipping, the guard stops
    assert [s["loss_scale"] for s in at_min] == [1.0, 1.0, 1.0] and all(s["overflow"] for s in at_min)
    assert [s["verdict"] is None for s in at_min] == [True, True, False]
    assert "fp16 loss scale collapsed: 3 consecutive overflow steps" in at_min[-1]["verdict"]


@pytest.mark.gpu
@pytest.mark.integration
@needs_cuda
def test_fp16_forced_overflow_is_skipped_and_halves_the_scale():
    r = probe("overflow")
    assert r["precision_line"].startswith("cuda: fp16 with dynamic loss scaling")
    _check_overflow_report(r, "cuda")


@pytest.mark.integration
def test_fp16_loss_scaling_logic_on_cpu():
    """The same sequence with fp16 forced on DeepSpeed's CPU accelerator: the logic of the GPU test, in CI."""
    _check_overflow_report(probe("overflow", "--force-fp16"), "cpu")


@pytest.mark.gpu
@pytest.mark.integration
@needs_cuda
def test_launcher_stops_when_the_fp16_scale_collapses(train_shards, tmp_path):
    """launcher/pretrain.py with the scale pinned at its minimum (2^0 = min_loss_scale 1) and an lr that turns
    the weights into inf: every later step overflows; after train.max_nonfinite of them at the minimum the run
    exits 3 naming the last good checkpoint. Its log has the CUDA fp16 line and none of trainer/cpu.py's."""
    from trainer import checkpoint_files

    ds = write_ds(tmp_path, micro=4, lr=1e30, clip=0.0)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=8, warmup_steps=0, save_every=1, max_nonfinite=2)
    p = subprocess.run([sys.executable, str(REPO / "launcher" / "pretrain.py"), "--deepspeed", ds, "--config", cfg,
                        "ds.fp16.initial_scale_power=0"], env=base_env(), capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    log = p.stdout + p.stderr
    assert p.returncode == 3, log[-5000:]
    assert "cuda: fp16 with dynamic loss scaling" in p.stdout
    assert not [line for line in CPU_LINES if line in log]
    tags = checkpoint_files.list_tags(str(out / "checkpoints"))
    assert "fp16 loss scale collapsed: 3 consecutive overflow steps at the minimum loss scale 1.0" in p.stderr
    assert f"last good checkpoint: {out / 'checkpoints' / tags[-1]}" in p.stderr
    recs = [r for r in read_records(out / "metrics.jsonl") if "loss_scale" in r]
    assert recs and all(r["loss_scale"] == 1.0 for r in recs) and recs[-1]["skipped_steps"] >= 2


# ---------------------------------------------------------------------------------------------------
# None of trainer/cpu.py on a CUDA host


@pytest.mark.integration
@pytest.mark.gpu
@pytest.mark.integration
@needs_cuda
def test_no_cpu_workaround_runs_on_cuda(tmp_path):
    """Engine built, stepped, saved and resumed through trainer.launch on CUDA: trainer/cpu.py was never
    imported (so no tcmalloc re-exec, numpy dropout masks, softmax attention, Adam beta^t replay or shm
    unlink), the model holds plain nn.Dropout and SDPA, tcmalloc is not mapped, nothing was unlinked in
    /dev/shm, and FusedAdam is DeepSpeed's CUDA builder's."""
    r = probe("host", tmp_path / "ckpt")
    assert (r["device"], r["precision"]) == ("cuda", "fp16")
    assert r["trainer_cpu_imported"] is False
    assert r["dropout_types"] == ["torch.nn.modules.dropout.Dropout"]
    assert r["attend"] == [r["sdpa_attention"]] == ["bert.model.sdpa_attention"]
    assert not r["tcmalloc_mapped"] and "tcmalloc" not in r["ld_preload"] and r["host_malloc_env"] is None
    assert r["shm_unlinked"] == [] and r["shm_buffers"] == []
    assert r["fused_adam_builder"] == "deepspeed.ops.op_builder.fused_adam"


@pytest.mark.integration
@pytest.mark.integration
@pytest.mark.skipif(CUDA, reason="the CPU control: on a CUDA host trainer/cpu.py must not run")
def test_host_probe_sees_every_cpu_workaround_on_cpu(tmp_path):
    """The control of the test above: on a CPU host the same probe sees each workaround, so "none seen" on
    CUDA is a finding, not a blind probe."""
    from trainer import cpu_start

    r = probe("host", tmp_path / "ckpt")
    assert r["device"] == "cpu" and r["trainer_cpu_imported"] is True
    assert r["dropout_types"] == ["trainer.cpu.FastDropout"]
    assert r["attend"] == ["trainer.cpu.softmax_attention"]
    assert r["tcmalloc_mapped"] == bool(cpu_start.find_tcmalloc())
    assert len(r["shm_unlinked"]) == 1 and r["shm_buffers"] == []
    assert r["fused_adam_builder"] == "deepspeed.ops.op_builder.cpu.fused_adam"
