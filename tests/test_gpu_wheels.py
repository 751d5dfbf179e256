"""scripts/gpu_wheels_check.py on fabricated wheel folders and device lists (CPU, no network)."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_wheels_check", ROOT / "scripts" / "gpu_wheels_check.py")
gwc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_wheels_check"] = gwc  # dataclasses look their module up by name
_spec.loader.exec_module(gwc)

DEVICE = {"numpy": "2.5.2", "torch": None}
ROOTS = {"app": [(Requirement("app"), "import app at x.py:1")]}


def wheel(folder: Path, name: str, version: str, *requires: str, tag: str = "py3-none-any", pad: int = 0) -> Path:
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
        z.writestr(f"{stem}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {tag}\n")
        if pad:
            z.writestr("pad.bin", b"\0" * pad)  # stored, not deflated: the file really is this big
    return path


@pytest.fixture
def whl(tmp_path: Path) -> Path:
    """A complete set: app needs lib and numpy (on the device); extras and other platforms don't count."""
    wheel(tmp_path, "app", "1.0", "lib>=1", "numpy>=1.26", "sphinx; extra == 'docs'", "pywin32; sys_platform == 'win32'")
    wheel(tmp_path, "lib", "1.0", "torch", tag="cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64")
    return tmp_path


def run(folder, roots=ROOTS, device=DEVICE, **kw):
    kw.setdefault("pinned", lambda name: None)
    kw.setdefault("requires_here", lambda name: None)
    return gwc.check(roots, device, folder, **kw)


def problems(report) -> str:
    return "\n".join(report.problems)


def test_complete_set_passes(whl):
    r = run(whl)
    assert r.problems == []
    assert r.status == {"app": "wheel", "lib": "wheel", "numpy": "device", "torch": "device"}


def test_missing_dependency(whl):
    (whl / "lib-1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl").unlink()
    r = run(whl, pinned={"lib": "1.0"}.get)
    assert "missing: lib==1.0 (needed by app)" in problems(r)
    assert r.pins == ["lib==1.0"]


def test_duplicate_versions(whl):
    wheel(whl, "lib", "1.1", "torch")
    assert "lib: 2 wheels" in problems(run(whl))


def test_shadowing_wheel_needs_explicit_allowance(whl):
    wheel(whl, "numpy", "2.4.6", tag="cp312-cp312-manylinux_2_28_x86_64")
    assert "would shadow the device's own numpy" in problems(run(whl))
    r = run(whl, allow_shadow=frozenset({"numpy"}))
    assert r.problems == [] and r.status["numpy"] == "wheel"


def test_oversize_folder(whl):
    wheel(whl, "big", "1.0", pad=50_000)
    r = run(whl, roots={**ROOTS, "big": [(Requirement("big"), "test")]}, max_bytes=40_000)
    assert "over the 0 MiB limit" in problems(r)
    assert r.total_bytes > 50_000


def test_wrong_tag_and_stale_version(whl):
    wheel(whl, "old", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    r = run(whl, roots={**ROOTS, "old": [(Requirement("old"), "test")]}, pinned={"old": "1.1", "app": "1.0"}.get)
    assert "does not install on CPython 3.12" in problems(r)
    assert "old: .whl has 1.0, this venv resolves 1.1" in problems(r)
    assert r.pins == ["old==1.1"]


def test_deepspeed_wheel_is_pure_and_carries_its_op_sources(whl):
    wheel(whl, "deepspeed", "0.19.8", tag="cp312-cp312-manylinux_2_17_x86_64")
    r = run(whl, roots={**ROOTS, "deepspeed": [(Requirement("deepspeed"), "test")]})
    assert "must be pure Python" in problems(r)
    assert "lacks deepspeed/ops/csrc/adam/multi_tensor_adam.cu" in problems(r)


def test_device_versions_are_checked(whl):
    wheel(whl, "app", "2.0", "lib", "numpy>=3", "torch>=2.4")
    (whl / "app-1.0-py3-none-any.whl").unlink()
    r = run(whl)
    assert "device has numpy 2.5.2, but app needs numpy>=3" in problems(r)
    assert any("unverified: torch>=2.4" in n for n in r.notes)  # the device's torch version is not listed


def test_not_carried_only_lazily(whl):
    roots = {**ROOTS, "datasets": [(Requirement("datasets"), "import datasets")]}
    assert run(whl, roots=roots).status["datasets"] == "not carried"
    eager = {"datasets": [gwc.Use("data/x.py", 3, False)]}
    assert "imported at module level: data/x.py:3" in problems(run(whl, roots=roots, eager=eager))


def test_plan_without_wheels_reads_local_metadata():
    r = gwc.check(ROOTS, DEVICE, None, pinned={"app": "1.0", "lib": "2.0"}.get,
                  requires_here={"app": ["lib", "numpy"], "lib": []}.get)
    assert r.problems == [] and sorted(r.pins) == ["app==1.0", "lib==2.0"]


def test_scan_marks_lazy_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("import os\nimport yaml\nfrom pkg import n\nimport n\n\n"
                                           "def f():\n    import datasets.x\n")
    (tmp_path / "pkg" / "n.py").write_text("")
    found = gwc.scan_imports(tmp_path, sorted((tmp_path / "pkg").glob("*.py")))
    assert found == {"yaml": [gwc.Use("pkg/m.py", 2, False)], "datasets": [gwc.Use("pkg/m.py", 7, True)]}


def test_device_list_from_kinds_md_round_trips(tmp_path):
    text = ("| pip list, as a session saw it | filtered by the names it asked for: numpy 2.5.2, torch 2.11.0 |\n"
            "## Python packages already there\n\nnvidia-h200: ... Packages: numpy, PyYAML, torch, typing_extensions.\n")
    device = gwc.parse_kinds_md(text)
    assert device == {"numpy": "2.5.2", "pyyaml": None, "torch": "2.11.0", "typing-extensions": None}
    (tmp_path / "list.txt").write_text(gwc.format_device_list(device))
    assert gwc.read_device_list(tmp_path / "list.txt") == device


def test_this_repo_plan_is_complete(capsys):
    """The real scan (CI: no device package list, no .whl): every import maps to the device or to a pinnable wheel."""
    assert gwc.main(["--dry-run", "--device-list", str(gwc.DEVICE_LIST)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for name in ("deepspeed", "hjson", "pydantic", "webdataset", "blingfire"):
        assert f"{name}==" in out
