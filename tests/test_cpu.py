"""trainer/cpu.py and trainer/cpu_start.py, the CPU host workarounds: tcmalloc preloaded by re-executing the
command keeps freed pages (the glibc fallback does not let the heap grow without bound), decided without
importing torch where no GPU driver is installed; py-cpuinfo is asked once per process, DeepSpeed's op builders
included; the fast dropout masks and the written-out
attention are exact in distribution and follow torch's seed; they are swapped into a model from outside and
change no state-dict key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bert import BertForPreTraining, BertForSequenceClassification
from helpers import make_batch, tiny_config
from trainer import cpu, cpu_start

# DeepSpeed's pattern that broke the demo under an earlier setting (mmap off, M_MMAP_MAX=0): a big, barely
# touched block per step, a little bigger each time, with a small long-lived allocation landing after it.
# Prints the growth of the process's data segment (VmData, MB) over 60 steps. Under mmap off it grew 5.9 GB
# here, but only while brk could extend the heap (once brk fails glibc falls back to mmap: 201 MB in one CI
# run), so the control that shows the measurement sees growth is the same loop holding on to its blocks.
GROWTH = """
import sys, torch
from trainer import cpu_start
assert cpu_start.keep_freed_memory()
def vmdata_mb():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmData"))
keep, v0 = [], vmdata_mb()
for i in range(60):
    big = torch.empty((100 << 20) + i * 4096, dtype=torch.uint8)
    big[:10] = 1
    keep.append(torch.ones(1000 + i))
    if sys.argv[1] == "hold":  # the control
        keep.append(big)
    del big
print(vmdata_mb() - v0)
"""

# A launcher's first line, then DeepSpeed's per-step pattern: blocks over glibc's 32 MiB mmap ceiling
# (200 MB, ~40 MB of a varying size, 20 MB), written and freed every step. Prints PID, allocator, the
# most minor page faults of a step after the first two, and those of the first step, which faults every page
# in fresh: the yardstick (a fault maps 4 KiB, or more where the kernel maps large folios: 16 KiB seen here).
# (tcmalloc at its default TCMALLOC_RELEASE_RATE
# hands some of these pages back and re-faults them: up to 61,000 faults in a step of this loop.)
REEXEC = """
import os, resource, torch
from trainer import cpu_start
cpu_start.preload_tcmalloc()
print(cpu_start.configure_allocator())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for i in range(30):
    f0 = faults()
    a = torch.ones(50 << 20)
    b = torch.ones((10 << 20) + i * 1000)
    del a
    c = torch.ones(5 << 20)
    del b, c
    per_step.append(faults() - f0)
print(os.getpid(), cpu_start.tcmalloc_loaded(), max(per_step[2:]), per_step[0])
"""

needs_tcmalloc = pytest.mark.skipif(cpu_start.find_tcmalloc() is None,
                                    reason="tcmalloc not installed (scripts/setup.sh installs it where it can)")


def vmdata_growth_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", GROWTH, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def run_reexec(**env_overrides) -> tuple[str, bool, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu_start.CHOICE_ENV, *cpu_start.TCMALLOC_ENV)}
    env.update(env_overrides)
    p = subprocess.Popen([sys.executable, "-c", REEXEC], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    lines = out.strip().splitlines()
    pid, loaded, faults, fresh = lines[-1].split()
    assert int(pid) == p.pid  # exec, not a child: launchers (deepspeed, torchrun, srun) keep tracking the PID
    return lines[-2], loaded == "True", int(faults), int(fresh)


@pytest.mark.integration
@pytest.mark.skipif(cpu_start._glibc() is None, reason="mallopt is glibc's")
def test_heap_address_space_stays_bounded():
    assert vmdata_growth_mb("hold") > 5000  # the control: 60 blocks of 100 MB held
    assert vmdata_growth_mb("keep") < 500


@pytest.mark.integration
@needs_tcmalloc
def test_preload_restarts_the_command_on_tcmalloc_which_keeps_freed_pages():
    line, loaded, faults, fresh = run_reexec()
    assert loaded and line.startswith("host allocator: tcmalloc")
    assert faults < fresh / 50  # freed pages are reused: (almost) none is faulted in again


@pytest.mark.integration
@pytest.mark.skipif(cpu_start._glibc() is None, reason="mallopt is glibc's")
def test_opting_out_keeps_glibc_which_refaults_big_blocks():
    line, loaded, faults, fresh = run_reexec(**{cpu_start.CHOICE_ENV: "glibc"})
    assert not loaded and line.startswith("host allocator: glibc, freed blocks up to 32 MiB reused")
    assert faults > fresh * 0.6  # the control: the 200 MB and ~40 MB blocks (of 260 MB) are faulted in every step


def test_glibc_env_takes_tcmalloc_out_and_keeps_the_rest():
    env = cpu_start.glibc_env({"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4:/y/libother.so", "PATH": "/bin",
                               "TCMALLOC_RELEASE_RATE": "0", cpu_start.CHOICE_ENV: "tcmalloc"})
    assert env == {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin", cpu_start.CHOICE_ENV: "glibc"}
    assert "LD_PRELOAD" not in cpu_start.glibc_env({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})


@needs_tcmalloc
def test_pretrain_launcher_runs_on_tcmalloc(eval_run):
    stdout = (Path(eval_run).parent / "launcher_stdout.txt").read_text()
    assert "[pretrain] host allocator: tcmalloc" in stdout


# A launcher's entry point on this host: what the command sees when it starts (after any re-execution).
LAUNCHED = """
import os, sys
from trainer import launch
launch.main(lambda argv: print(os.getpid(), "torch" in sys.modules, os.environ.get("BERT_HOST_MALLOC")))
"""
no_gpu_driver = pytest.mark.skipif(any(os.path.exists(p) for p in cpu_start.GPU_DRIVER_FILES),
                                   reason="a GPU driver is installed here: torch is asked whether there is a device")


@no_gpu_driver
@needs_tcmalloc
def test_launcher_reexecutes_before_importing_torch_where_there_is_no_gpu_driver():
    """torch is imported once, after the re-execution on tcmalloc: deciding "CPU host" by asking torch first
    imported it twice (~2.5 s of every rank's start-up)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu_start.CHOICE_ENV, "DS_ACCELERATOR")}
    p = subprocess.Popen([sys.executable, "-c", LAUNCHED], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = p.communicate(timeout=120)
    pid, torch_imported, choice = out.split()
    assert int(pid) == p.pid and choice == "tcmalloc"  # re-executed in place, on tcmalloc
    assert torch_imported == "False"  # neither before the re-execution nor after it, until the command needs it


def test_another_deepspeed_accelerator_asked_for_is_not_a_cpu_host(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert not cpu_start.cpu_host()


def test_cpuinfo_is_asked_once_for_every_op_deepspeed_loads(monkeypatch):
    """DeepSpeed's CPU op builder asks py-cpuinfo twice per op load (arch, SIMD width); each ask is a subprocess
    that sleeps 1 s. After ask_cpuinfo_once every ask, DeepSpeed's included, gets the one answer."""
    import cpuinfo
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder, ShareMemCommBuilder

    asked = []
    real = {"arch": "X86_64", "flags": ["avx2", "fma"]}
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or dict(real))
    cpu_start.ask_cpuinfo_once()
    cpu_start.ask_cpuinfo_once()  # a second call keeps the first answer
    for builder in (FusedAdamBuilder(), ShareMemCommBuilder()):
        assert builder.cpu_arch() == "-march=native" and builder.simd_width() == "-D__AVX256__"
    assert cpuinfo.get_cpu_info() == real and len(asked) == 1


def test_a_failed_cpuinfo_ask_is_asked_again(monkeypatch):
    import cpuinfo

    answers = iter([{}, {"arch": "X86_64", "flags": []}])
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: next(answers))
    cpu_start.ask_cpuinfo_once()
    assert cpuinfo.get_cpu_info() == {"arch": "X86_64", "flags": []}


# ---------------------------------------------------------------------------------------------------
# Dropout masks and attention

def test_cpu_dropout_drops_p_and_scales_the_rest():
    from trainer.cpu import dropout
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.1, True)
    dropped = (y == 0).float().mean().item()
    p = 6554 / 65536  # round(0.1 * 2^16) / 2^16
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # binomial, 5 sigma
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 0.9]))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx = mask: the same units are dropped backward
    # Rows are not all alike (a broadcast or constant mask would be)
    assert not torch.equal(y[0], y[1])


def test_cpu_dropout_masks_follow_torch_seed_and_eval_is_identity():
    from trainer.cpu import dropout
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = dropout(x, 0.1, True)
    torch.manual_seed(3)
    b = dropout(x, 0.1, True)
    c = dropout(x, 0.1, True)  # the generator moved on: a new mask
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert dropout(x, 0.1, False) is x or torch.equal(dropout(x, 0.1, False), x)
    bf = dropout(x.bfloat16(), 0.1, True)
    assert bf.dtype == torch.bfloat16


def test_training_attention_is_unbiased_and_masks_padding():
    """The CPU training path (explicit softmax + fast dropout) averages to the eval path (SDPA, no dropout),
    and padded keys get no weight in it."""
    from bert.model import BertSelfAttention
    config = tiny_config(attention_probs_dropout_prob=0.3)
    att = BertSelfAttention(config)
    att.attend = cpu.softmax_attention
    batch = make_batch(config)
    B, S = batch["input_ids"].shape
    x = torch.randn(B, S, config.hidden_size)
    mask = batch["attention_mask"].bool()[:, None, None, :]
    with torch.no_grad():
        expect = att.eval()(x, mask)
        att.train()
        torch.manual_seed(0)
        mean = sum(att(x, mask) for _ in range(2000)) / 2000
        # Dropout is unbiased: the average output approaches the no-dropout output (a missing 1/(1-p)
        # would be 30% off; a wrong mask or softmax axis further still).
        torch.testing.assert_close(mean, expect, rtol=0, atol=0.02)
        noise = torch.randn(B, S, config.hidden_size) * (~mask[:, 0, 0, :, None])
        torch.manual_seed(1)
        a = att(x, mask)
        torch.manual_seed(1)
        b = att(x + noise, mask)  # only padded rows changed: keys/values there must not matter
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(b[real], a[real], rtol=0, atol=1e-6)




def test_kernels_are_swapped_in_from_outside_and_change_no_key():
    """bert/model.py holds nn.Dropout and SDPA only; install_kernels replaces them in place on a CPU host."""
    import bert.model

    assert "numpy" not in open(bert.model.__file__).read()  # the model file has no CPU kernel
    for model in (BertForPreTraining(tiny_config()), BertForSequenceClassification(tiny_config(), 3)):
        keys = list(model.state_dict())
        assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))
        assert {m.attend for m in model.modules() if hasattr(m, "attend")} == {bert.model.sdpa_attention}
        cpu.install_kernels(model)
        assert list(model.state_dict()) == keys
        drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert drops and all(type(m) is cpu.FastDropout and m.p == 0.1 for m in drops)
        assert {m.attend for m in model.modules() if hasattr(m, "attend")} == {cpu.softmax_attention}


def test_installed_kernels_train_like_the_plain_model_in_eval():
    """Eval (no dropout) is unchanged by the swap: the same numbers to the last bit."""
    torch.manual_seed(0)
    plain = BertForPreTraining(tiny_config()).eval()
    fast = BertForPreTraining(tiny_config())
    fast.load_state_dict(plain.state_dict())
    cpu.install_kernels(fast).eval()
    batch = make_batch(tiny_config())
    with torch.no_grad():
        assert torch.equal(plain(**batch).loss, fast(**batch).loss)
