"""Run configuration: YAML -> dataclasses, precedence, unknown keys, types; shipped configs load."""

import glob
import os

import pytest

from trainer import config
from trainer.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write(tmp_path, "data: {train: shards}\ntrain: {max_steps: 50, log_every: 7}\n")
    cfg = config.load(path, ["train.max_steps=10", "model.hidden_dropout_prob=0.0", "train.init_from=null",
                             "data.dynamic_masking=true"])
    assert cfg.train.max_steps == 10  # override beats YAML
    assert cfg.train.log_every == 7  # YAML beats default
    assert cfg.train.save_every == config.TrainConfig().save_every  # default
    assert cfg.train.init_from is None and cfg.data.dynamic_masking is True
    assert cfg.model == {"preset": "base", "hidden_dropout_prob": 0.0}


@pytest.mark.parametrize("text, overrides, key", [
    ("data: {train: s}\ntrain: {max_step: 5}\n", [], "train.max_step"),
    ("data: {train: s, trian: x}\n", [], "data.trian"),
    ("data: {train: s}\nmodel: {preset: tiny, hidden: 3}\n", [], "model.hidden"),
    ("data: {train: s}\noptimizer: {lr: 1}\n", [], "optimizer"),
    ("data: {train: s}\n", ["train.warmup=3"], "train.warmup"),
])
def test_unknown_keys_are_refused_by_name(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text), overrides)
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps=ten", "train.max_steps' must be int"),
    ("train.max_steps=0", "train.max_steps must be > 0"),
    ("train.log_batch_keys=3", "must be bool"),
    ("model.preset=huge", "model.preset 'huge'"),
    ("max_steps=3", "section.key=value"),
    ("train.max_steps", "key.sub=value"),
])
def test_bad_values_name_the_key(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "data: {train: s}\n"), [override])
    assert fragment in str(e.value)


def test_data_train_required_and_warmup_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="data.train is required"):
        config.load(write(tmp_path, "train: {max_steps: 3}\n"))
    with pytest.raises(ConfigError, match="only one of"):
        config.load(write(tmp_path, "data: {train: s}\ntrain: {warmup_steps: 3, warmup_fraction: 0.1}\n"))


def test_warmup_resolution(tmp_path):
    t = config.TrainConfig(max_steps=1000)
    assert config.warmup_steps(t) == 10  # BERT's 1%
    t.warmup_fraction = 0.05
    assert config.warmup_steps(t) == 50
    t.warmup_fraction, t.warmup_steps = None, 7
    assert config.warmup_steps(t) == 7


def test_float_fields_accept_ints_and_round_trip(tmp_path):
    cfg = config.load(write(tmp_path, "data: {train: s}\ntrain: {warmup_fraction: 0, peak_tflops: 100}\n"))
    assert isinstance(cfg.train.warmup_fraction, float) and cfg.train.peak_tflops == 100.0
    again = config.build(config.RunConfig, cfg.to_dict())
    assert again == cfg


def test_model_config_takes_vocab_from_shards_unless_fixed(tmp_path):
    cfg = config.load(write(tmp_path, "data: {train: s}\nmodel: {preset: tiny}\n"))
    bc = cfg.bert_config(vocab_size=1234)
    assert (bc.vocab_size, bc.num_hidden_layers, bc.hidden_size) == (1234, 2, 128)
    cfg = config.load(write(tmp_path, "data: {train: s}\nmodel: {preset: tiny, vocab_size: 99}\n"))
    assert cfg.bert_config(vocab_size=1234).vocab_size == 99  # then the shard check refuses the mismatch


PRETRAIN_CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if "finetune" not in p)


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS)
def test_shipped_configs_load(path):
    cfg = config.load(path)
    cfg.bert_config(vocab_size=30522)
    assert cfg.train.max_steps > config.warmup_steps(cfg.train)


def test_finetune_config_and_its_flags_are_one_style(tmp_path):
    """launcher/finetune.py's flags are overrides of FinetuneConfig keys; --lr overrides the DeepSpeed JSON."""
    from launcher.finetune import build_parser, overrides_of

    cfg = config.load(os.path.join(REPO, "configs", "finetune.yaml"), cls=config.FinetuneConfig)
    assert cfg.train.sweep_lrs == config.SWEEP_LRS and cfg.task.name == "sst2" and cfg.model.dropout == 0.1
    a = build_parser().parse_intermixed_args(["--deepspeed", "f.json", "--model", "run", "--train", "t.csv", "--dev",
                                              "d.csv", "--epochs", "2", "--lr", "1e-3", "--export-hf", "--out", "o",
                                              "task.max_len=64"])
    ov = overrides_of(a)
    assert "ds.optimizer.params.lr=1e-3" in ov and ov[-1] == "task.max_len=64"
    got = config.load(None, [o for o in ov if not o.startswith("ds.")], config.FinetuneConfig)
    assert (got.model.path, got.task.train, got.task.dev, got.train.epochs, got.train.export_hf,
            got.task.max_len, got.train.out) == ("run", "t.csv", "d.csv", 2, True, 64, "o")
    assert got.train.sweep_lrs == []  # one run at the JSON's (overridden) lr
    sweep = overrides_of(build_parser().parse_intermixed_args(["--deepspeed", "f", "--sweep"]))
    assert config.load(None, ["model.path=m", "train.out=o", "task.name=sst2", *sweep],
                       config.FinetuneConfig).train.sweep_lrs == config.SWEEP_LRS
    for bad, fragment in ((["train.out=o", "task.name=x"], "model.path is required"),
                          (["model.path=m", "train.out=o"], "exactly one of task.name"),
                          (["model.path=m", "train.out=o", "task.train=t"], "needs task.dev"),
                          (["model.path=m", "train.out=o", "task.name=x", "train.lr=1"], "unknown config key 'train.lr'")):
        with pytest.raises(ConfigError, match=fragment):
            config.load(None, bad, config.FinetuneConfig)


def test_eval_config_and_its_flags():
    from launcher.evaluate import FLAGS, build_parser

    a = build_parser().parse_intermixed_args(["--checkpoint", "r", "--data", "s", "--ranks", "2", "eval.split=train"])
    ov = [f"eval.{f}={getattr(a, f)}" for f in FLAGS if getattr(a, f) is not None] + a.overrides
    e = config.load(None, ov, config.EvalConfig).eval
    assert (e.checkpoint, e.data, e.ranks, e.split, e.micro_batch) == ("r", "s", 2, "train", None)
    with pytest.raises(ConfigError, match="eval.dtype"):
        config.load(None, ["eval.checkpoint=r", "eval.data=s", "eval.dtype=int8"], config.EvalConfig)


def test_shipped_config_set_is_complete():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))}
    assert {"demo.yaml", "base_phase1.yaml", "base_phase2.yaml", "large_phase1.yaml", "large_phase2.yaml"} <= names
    # Phase 2 continues phase 1 with the same model, so init_from's strict weight load fits.
    for size in ("base", "large"):
        p1 = config.load(os.path.join(REPO, "configs", f"{size}_phase1.yaml"))
        p2 = config.load(os.path.join(REPO, "configs", f"{size}_phase2.yaml"))
        assert p1.bert_config(30522) == p2.bert_config(30522)
        assert p2.train.init_from and p2.train.init_from.startswith(p1.train.output_dir)
