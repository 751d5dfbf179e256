"""trainer.metrics.read_records, the one reader of metrics.jsonl: it returns what MetricsWriter wrote, passes
over only a last line cut by a kill, and names the file and line of any other damage."""

import json

import pytest

from common.errors import UserError
from trainer.metrics import MetricsWriter, read_records


def written(tmp_path, records):
    w = MetricsWriter(str(tmp_path), enabled=True)
    for r in records:
        w.record(r)
    w.close()
    return tmp_path / "metrics.jsonl"


def test_reads_back_what_the_writer_wrote_in_order(tmp_path):
    recs = [{"step": 1, "loss": 2.5}, {"step": 2, "val/mlm_loss": 3.0}, {"step": 2, "loss": float("nan")}]
    got = read_records(written(tmp_path, recs))
    assert got == [recs[0], recs[1], {"step": 2, "loss": "nan"}]  # non-finite values as the writer keeps them


def test_a_last_line_cut_mid_write_is_left_out(tmp_path):
    path = written(tmp_path, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}])
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a kill -9 in the middle of the write
    assert [r["step"] for r in read_records(path)] == [1, 2]


def test_damage_before_the_last_line_names_file_and_line(tmp_path):
    path = written(tmp_path, [{"step": 1, "loss": 1.0}])
    with open(path, "a") as f:
        f.write('{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n')  # a cut line with a record after it
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2: not valid JSON"):
        read_records(path)


def test_a_complete_last_line_that_is_not_json_is_damage(tmp_path):
    path = written(tmp_path, [{"step": 1, "loss": 1.0}])
    with open(path, "a") as f:
        f.write("garbage\n")  # ends with its newline: not a cut write
    with pytest.raises(UserError, match=r"line 2: not valid JSON"):
        read_records(path)


def test_a_record_must_be_an_object(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps([1, 2]) + "\n")
    with pytest.raises(UserError, match=r"line 2: expected a JSON object per line, not list"):
        read_records(path)


def test_a_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"nowhere/metrics.jsonl: metrics file not found"):
        read_records(tmp_path / "nowhere" / "metrics.jsonl")
