"""python -m data.inspect: readable examples and statistics that agree with the algorithm."""

import json
import shutil

from data import shards
from data.inspect import main
from helpers import damage


def test_inspect_json_statistics(data_built, capsys):
    assert main([data_built, "--json", "--split", "all"]) == 0
    st = json.loads(capsys.readouterr().out)
    m = shards.read_manifest(data_built)
    assert st["examples"] == st["manifest_examples"] == m["stats"]["examples"]
    assert st["tokens"] == m["stats"]["tokens"]
    assert st["layout_errors"] == 0 and st["length_max"] <= 128
    assert st["masked_equal_formula_share"] == 1.0 and st["masked_above_formula"] == 0
    assert abs(st["mask_share"] - 0.8) < 0.02 and abs(st["kept_share"] - 0.1) < 0.02
    assert abs(st["random_share"] - 0.1) < 0.02
    assert abs(st["short_target_draw_share"] - 0.1) < 0.03
    assert abs(st["nsp_random_next_share"] - m["stats"]["random_next"] / m["stats"]["examples"]) < 1e-9
    assert sum(st["length_histogram"].values()) == st["examples"]
    assert st["tokenizer_fingerprint"] == m["tokenizer"]["fingerprint"]


def test_inspect_human_output(data_built, capsys):
    assert main([data_built, "--n", "2", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- b") == 2 and "[MASK]{" in out and "NSP label" in out
    assert "A: [CLS]" in out and "B: [SEP]" not in out and "target 80/10/10" in out


def test_inspect_missing_manifest(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "manifest.json: manifest not found" in capsys.readouterr().err


def test_verify_lists_exactly_the_damaged_shards(data_built, tmp_path, capsys):
    assert main([data_built, "--verify"]) == 0
    assert "all sound" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(data_built, copy)
    names = [s["name"] for s in shards.read_manifest(str(copy))["splits"]["train"]["shards"]]
    assert len(names) >= 3
    kinds = {names[0]: "cut_0.1%", names[1]: "missing", names[-1]: "garbage_member"}
    for name, kind in kinds.items():
        damage(str(copy), name, kind)
    assert main([str(copy), "--verify"]) == 1
    out = capsys.readouterr().out
    listed = [line.split(":")[0] for line in out.splitlines() if not line.startswith("verified")]
    assert sorted(listed) == sorted(kinds)
    assert "truncated" in out and "missing: no such file" in out and "1 record(s) do not decode" in out
    assert main([str(copy), "--verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in report["damaged"]} == set(kinds)
    assert report["shards"] == len(names) + len(shards.read_manifest(str(copy))["splits"]["valid"]["shards"])
