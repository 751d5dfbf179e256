"""common.files: atomic writes leave the old file or the new one, never a piece; strict reads name the file."""

import json
import os

import pytest

from common import files
from common.errors import UserError


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    files.write_json(p, {"x": 1})
    files.write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert os.listdir(tmp_path) == ["a.json"]
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    files.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(p) as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(TypeError):  # not JSON-serialisable half-way through
        files.write_json(p, {"a": 1, "b": object()})
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_is_complete_or_absent(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(target) as d:
            (open(os.path.join(d, "part"), "w")).close()
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with files.atomic_dir(target) as d:
        files.write_text(os.path.join(d, "f"), "1")
    assert (target / "f").read_text() == "1"
    with pytest.raises(UserError, match="exists"):
        with files.atomic_dir(target):
            pass
    with files.atomic_dir(target, replace=True) as d:
        files.write_text(os.path.join(d, "g"), "2")
    assert os.listdir(target) == ["g"] and sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("text, match", [
    ("{\"a\": 1,\n \"b\": }", r"not valid JSON \(line 2, column 7"),
    ("[1, 2]", "must hold a JSON dict, not list"),
])
def test_read_json_names_file_and_place(tmp_path, text, match):
    p = tmp_path / "m.json"
    p.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        files.read_json(p, "manifest")
    assert str(p) in str(e.value)
    with pytest.raises(UserError, match="manifest not found"):
        files.read_json(tmp_path / "none.json", "manifest")


def test_read_yaml_is_safe_and_strict(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        files.read_yaml(p, "config")
    p.write_text("a: [1,\nb: 2\n")
    with pytest.raises(UserError, match=r"line \d+, column \d+"):
        files.read_yaml(p, "config")
    p.write_text("")
    assert files.read_yaml(p, "config") == {}
    p.write_text("- 1\n")
    with pytest.raises(UserError, match="mapping, not list"):
        files.read_yaml(p, "config")


def test_read_jsonl_is_strict_unless_a_cut_last_line_is_allowed(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"b": 2}\n{"c": ')  # a blank line, then a last line without its newline
    with pytest.raises(UserError, match=r"rows.jsonl: line 4: not valid JSON"):
        files.read_jsonl(p)  # user data: a cut line is an error, never a silently shorter file
    assert files.read_jsonl(p, cut_last_ok=True) == [{"a": 1}, {"b": 2}]
    p.write_text('{"a": 1}\n"text"\n')
    with pytest.raises(UserError, match=r"line 2: expected a JSON object per line, not str"):
        files.read_jsonl(p)
    with pytest.raises(UserError, match=r"gone.jsonl: rows not found"):
        files.read_jsonl(tmp_path / "gone.jsonl", "rows")
