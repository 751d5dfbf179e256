"""python -m data.inspect: readable examples and statistics that agree with the algorithm."""

import json

from data import shards
from data.inspect import main


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
