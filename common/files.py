"""The one way files a user depends on are written and read.

Writes go to a temporary name in the same folder, are flushed to disk, and are renamed over the target: a
reader (or a run killed half-way, or a full quota) sees the old file or the new one, never a piece of one.
Reads of JSON and YAML turn a missing, unreadable or malformed file into a ``UserError`` naming the file
(and the line, where the parser knows it) instead of a traceback. YAML is read with ``safe_load`` only:
reading a config never constructs arbitrary objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import yaml

from common.errors import UserError


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse fsync on a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. some network file systems: the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed over ``path``, on an
    exception it is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run folder is shared with colleagues
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``path`` to fill; on a clean exit it becomes ``path``. An existing
    ``path`` is refused unless ``replace`` (then it is swapped out only after the new folder is complete).
    On an exception the temporary folder is removed and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not replace:
        raise UserError(f"{path} exists; refusing to write over it (choose another folder or remove it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.lexists(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _read(path: str | os.PathLike, what: str, parse: Callable[[IO], Any]) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what}: {e}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", kind: type | None = dict) -> Any:
    """Parse a JSON file; a missing or malformed file (or a top level that is not ``kind``) is a UserError
    naming the file, the line and the column."""
    def parse(f):
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: the {what} is not valid JSON (line {e.lineno}, column {e.colno}: "
                            f"{e.msg})") from None
    obj = _read(path, what, parse)
    if kind is not None and not isinstance(obj, kind):
        raise UserError(f"{path}: the {what} must hold a JSON {kind.__name__}, not {type(obj).__name__}")
    return obj


def read_yaml(path: str | os.PathLike, what: str = "YAML file", kind: type | None = dict) -> Any:
    """Parse a YAML file with ``safe_load`` (plain data only); an empty file is ``{}`` for a mapping."""
    def parse(f):
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise UserError(f"{path}: the {what} is not valid YAML{where}: "
                            f"{getattr(e, 'problem', None) or e}") from None
    obj = _read(path, what, parse)
    if obj is None and kind is dict:
        return {}
    if kind is not None and not isinstance(obj, kind):
        raise UserError(f"{path}: the {what} must hold a YAML {'mapping' if kind is dict else kind.__name__}, "
                        f"not {type(obj).__name__}")
    return obj


def read_jsonl(path: str | os.PathLike, what: str = "JSON lines file", cut_last_ok: bool = False) -> list[dict]:
    """The JSON objects of a file with one per line, in order; blank lines are skipped. A line that is not a
    JSON object is a UserError naming the file and the line, except, with ``cut_last_ok``, a last line
    without its newline that does not parse: a write cut by a kill (or still under way), left out."""
    def parse(f):
        lines = f.read().split("\n")  # the last item is "" when the file ends with its newline
        records = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if cut_last_ok and n == len(lines):
                    break
                raise UserError(f"{path}: line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {n}: expected a JSON object per line, not {type(record).__name__}")
            records.append(record)
        return records
    return _read(path, what, parse)
