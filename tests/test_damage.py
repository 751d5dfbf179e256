"""Damaged shards in a real 2-rank run (issue 17): every kind of damage at once, one shard each (0.1% cut, half
cut, zero bytes, missing from disk, garbage bytes inside one member). Below the thresholds the run finishes
and reports each loss once over the ranks; above them every rank stops at the same step with one message and
a checkpoint, and the same command resumes once the shards are replaced.

(That each kind leaves every other shard's samples byte for byte as they were, in their order, is
tests/test_loader.py::test_damage_stays_inside_its_shard.)"""

import shutil
import tarfile
from pathlib import Path

import pytest

from data import shards as ds
from helpers import damage, start_ranks, train_records, write_ds, write_run
from trainer.checkpoint_files import list_tags, tag_for

pytestmark = pytest.mark.integration
KINDS = ["cut_0.1%", "cut_half", "zero_byte", "missing", "garbage_member"]  # shards 0-4; shard 5 stays sound


def run_ranks(procs, tmp, name, ds_path, cfg, *overrides, expect):
    ranks = start_ranks(procs, tmp, ds_path, cfg, *overrides, name=name)
    codes = procs.wait(ranks, 300)
    logs = [procs.output(p) for p in ranks]
    assert codes == [expect, expect], f"exits {codes}\n{logs[0][1][-4000:]}\n---\n{logs[1][1][-3000:]}"
    return logs


@pytest.fixture(scope="module")
def folders(tmp_path_factory, train_shards):
    """A damaged copy of the trainer's shards, and what an independent reader (tarfile) finds in each shard."""
    tmp = tmp_path_factory.mktemp("damage")
    bad = tmp / "bad"
    shutil.copytree(train_shards, bad)
    entries = ds.read_manifest(str(bad))["splits"]["train"]["shards"]
    assert len(entries) == 6
    victims = {e["name"]: kind for e, kind in zip(entries, KINDS)}
    for name, kind in victims.items():
        damage(str(bad), name, kind)
    lost = {e["name"]: e["samples"] - whole_members(bad / e["name"]) for e in entries[:4]}
    epoch_steps = sum(e["samples"] for e in entries) // 16  # 16 sequences per step (micro 8 on 2 ranks)
    return {"tmp": tmp, "good": train_shards, "bad": bad, "victims": victims, "lost": lost, "steps": epoch_steps}


def whole_members(path: Path) -> int:
    """Members the standard library's tar reader reads whole, up to the end or the damage (the oracle)."""
    n = 0
    try:
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                tf.extractfile(m).read()
                n += 1
    except (FileNotFoundError, tarfile.ReadError, EOFError):
        pass
    return n


def test_below_thresholds_the_run_finishes_and_counts_each_loss_once(folders, tmp_path, procs):
    ds_path = write_ds(tmp_path, micro=8, fp16=False)  # 16 sequences per step on 2 ranks
    out = tmp_path / "run"
    steps = folders["steps"]  # one epoch: every position read once, the garbled sample included
    cfg = write_run(tmp_path, folders["bad"], out, data={"num_workers": 2, "max_bad_fraction": 0.6,
                                                          "max_bad_shards": 4}, max_steps=steps, log_every=50)
    logs = run_ranks(procs, tmp_path, "below", ds_path, cfg, expect=0)
    last = train_records(out)[steps]
    assert last["data/bad_shards"] == 4  # the four shard-level damages, each once though both ranks read them
    assert last["data/missing_samples"] == sum(folders["lost"].values())
    assert last["data/shards_read"] == 6
    assert last["data/corrupt_samples"] == 1  # the garbled member, read once in the epoch by one rank
    assert last["samples_seen"] < steps * 16  # lost samples shorten their batches
    for r, (out_text, err) in enumerate(logs):
        for name, kind in list(folders["victims"].items())[:4]:
            assert err.count(f"shard {name}:") == 1, (r, name, err[-3000:])  # each rank says it once
        assert "Traceback" not in err


def test_above_thresholds_every_rank_stops_then_resumes_once_replaced(folders, tmp_path, procs):
    bad = tmp_path / "bad"
    shutil.copytree(folders["bad"], bad)
    ds_path = write_ds(tmp_path, micro=8, fp16=False)
    out = tmp_path / "run"
    # 2 damaged shards tolerated: seed 7's first shuffle block (4 shards) holds two of them, so the run stops
    # when the second block's shards are opened, some 70 steps in
    steps = folders["steps"]
    cfg = write_run(tmp_path, bad, out, data={"num_workers": 2, "max_bad_shards": 2, "max_bad_fraction": 0.5},
                    max_steps=steps, log_every=50, save_every=1000)
    (_, err0), (_, err1) = run_ranks(procs, tmp_path, "strict", ds_path, cfg, expect=2)
    assert "Traceback" not in err0 + err1 and "gloo" not in err0 + err1
    stops = [ln for ln in err0.splitlines() if ln.startswith("error: stopping at step")]
    assert len(stops) == 1 and "error: stopping" not in err1  # one message, from rank 0
    msg = stops[0]
    step = int(msg.split("stopping at step ")[1].split(":")[0])
    named = [n for n in folders["victims"] if n in msg]
    assert step > 10 and sorted(named) == sorted(folders["lost"])  # the four shard-level damages
    assert "in 4 damaged shard(s), more than data.max_bad_shards=2:" in msg
    assert "let the run continue without them with data.max_bad_fraction=" in msg
    assert "data.max_bad_shards=4" in msg and "--verify" in msg
    assert list_tags(str(out / "checkpoints")) == [tag_for(step)]  # the last good state
    # Replace the damaged shards, run the same command: the run goes on from that step and finishes.
    for name in folders["victims"]:
        shutil.copy(Path(folders["good"]) / name, bad / name)
    (out0, err0), _ = run_ranks(procs, tmp_path, "resumed", ds_path, cfg, expect=0)
    assert f"resumed from {out / 'checkpoints' / tag_for(step)}" in out0 + err0
    assert "5 of 5 shard(s) with losses on record are sound now" in out0 + err0  # the garbled one too
    recs = train_records(out)
    assert max(recs) == steps and recs[steps]["data/bad_shards"] == 0 and recs[steps]["data/missing_samples"] == 0
