"""The precision decision: every branch as a pure function (no hardware needed), the CPUID facts it reads,
and the warning for bf16 asked for where it is only emulated."""

import os
import platform

import pytest

from trainer import precision as prec
from trainer.precision import DeviceFacts, cpu_facts, cuda_facts, decide


@pytest.mark.parametrize("request_, facts, expect, line", [
    # fp16 asked (the shipped JSONs): kept where fp16 is fast ...
    ("fp16", cuda_facts((7, 0)), "fp16", "cuda: fp16 with dynamic loss scaling (compute capability 7.0)"),
    ("fp16", cuda_facts((9, 0)), "fp16", "cuda: fp16 with dynamic loss scaling (compute capability 9.0)"),
    # ... else native bf16, else fp32
    ("fp16", cpu_facts({"avx2", "avx512f", "avx512_bf16"}, "x86_64", ""), "bf16",
     "cpu: no fast fp16; native bf16 (AVX512_BF16): fp16 -> bf16"),
    ("fp16", cpu_facts({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "x86_64", ""), "bf16",
     "cpu: no fast fp16; native bf16 (AMX): fp16 -> bf16"),
    ("fp16", cpu_facts({"avx2"}, "x86_64", ""), "fp32", "cpu: no native bf16 (AVX2): fp16 -> fp32"),
    ("fp16", cpu_facts({"avx2", "avx512f", "avx512bw"}, "x86_64", ""), "fp32",
     "cpu: no native bf16 (AVX-512 without BF16): fp16 -> fp32"),
    ("fp16", cpu_facts({"fp", "asimd", "bf16"}, "aarch64", ""), "bf16",
     "cpu: no fast fp16; native bf16 (Arm BF16): fp16 -> bf16"),
    ("fp16", cpu_facts({"fp", "asimd"}, "aarch64", ""), "fp32", "cpu: no native bf16 (Arm without BF16): fp16 -> fp32"),
    # oneDNN capped below its bf16 kernels: not native for torch's matmuls either
    ("fp16", cpu_facts({"avx512f", "avx512_bf16"}, "x86_64", "AVX2"), "fp32",
     "cpu: no native bf16 (AVX512_BF16, but ONEDNN_MAX_CPU_ISA=AVX2): fp16 -> fp32"),
    ("fp16", cpu_facts({"avx512f", "avx512_bf16"}, "x86_64", "avx512_core_bf16"), "bf16",
     "cpu: no fast fp16; native bf16 (AVX512_BF16): fp16 -> bf16"),
    # bf16 asked: native, or run as asked and flagged
    ("bf16", cuda_facts((8, 0)), "bf16", "cuda: bf16 (compute capability 8.0)"),
    ("bf16", cpu_facts({"avx512_bf16"}, "x86_64", ""), "bf16", "cpu: bf16 (AVX512_BF16)"),
    ("fp32", cpu_facts({"avx2"}, "x86_64", ""), "fp32", "cpu: fp32 as requested (AVX2)"),
])
def test_decision_branches(request_, facts, expect, line):
    d = decide(request_, facts)
    assert (d.precision, d.line, d.emulated) == (expect, line, False)


@pytest.mark.parametrize("facts", [cuda_facts((7, 0)), cpu_facts({"avx2"}, "x86_64", "")])
def test_explicit_bf16_where_it_is_emulated_runs_but_is_flagged(facts):
    d = decide("bf16", facts)
    assert d.precision == "bf16" and d.emulated and "only emulates it" in d.line


def test_facts_and_requests():
    assert cuda_facts((6, 0)) == DeviceFacts("cuda", True, False, "compute capability 6.0")
    assert not cuda_facts((5, 2)).fast_fp16
    assert prec.requested({"fp16": {"enabled": True}}) == "fp16"
    assert prec.requested({"bf16": {"enabled": True}, "fp16": {"enabled": False}}) == "bf16"
    assert prec.requested({}) == "fp32"
    with pytest.raises(ValueError, match="int8"):
        decide("int8", cpu_facts({"avx2"}, "x86_64", ""))


def test_apply_rewrites_only_the_precision_blocks():
    ds = {"fp16": {"enabled": True, "loss_scale": 0}, "optimizer": {"type": "AdamW"}, "train_batch_size": 8}
    assert prec.apply(ds, "bf16") == {"optimizer": {"type": "AdamW"}, "train_batch_size": 8, "bf16": {"enabled": True}}
    assert prec.apply(ds, "fp32") == {"optimizer": {"type": "AdamW"}, "train_batch_size": 8}
    assert prec.apply(ds, "fp16") == ds
    assert prec.apply({"bf16": {"enabled": True}}, "fp16") == {"fp16": {"enabled": True}}


def test_this_machines_facts_come_from_cpuid():
    """On this machine the facts read /proc/cpuinfo's flags, not DeepSpeed's or oneDNN's answers."""
    flags = prec._cpuinfo_flags()
    if not flags or platform.machine() != "x86_64":
        pytest.skip("an x86 /proc/cpuinfo is needed")
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() not in ("", *prec._ONEDNN_BF16_ISAS)
    assert cpu_facts().native_bf16 == (bool({"avx512_bf16", "amx_bf16"} & flags) and not capped)


def test_emulation_warning_measures_the_ratio():
    from trainer.engine import Resolved, precision_note

    d = decide("bf16", cpu_facts({"avx2"}, "x86_64", ""))
    note = precision_note(Resolved({}, None, d, "cpu"))
    assert note.startswith(d.line) and "x slower than fp32 here" in note
