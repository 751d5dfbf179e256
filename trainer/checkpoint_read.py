"""Reading a trained model back on one process, offline: for launcher/export_hf.py, launcher/evaluate.py,
fine-tuning's model.path and pretraining's train.init_from. Nothing here writes a checkpoint or needs a
process group (the write side is trainer.checkpoint; both read folders through trainer.checkpoint_files).

A run directory is what pretraining writes (trainer.pretrain)::

    RUN_DIR/config.yaml            the resolved run configuration
    RUN_DIR/ds_config.json         the resolved DeepSpeed config (batch triple and precision as trained)
    RUN_DIR/model_config.json      BertConfig.to_dict()
    RUN_DIR/tokenizer/             copy of the shards' tokenizer
    RUN_DIR/metrics.jsonl, tensorboard/
    RUN_DIR/checkpoints/           see trainer.checkpoint_files

The weights are consolidated to fp32 with DeepSpeed's own API (`get_fp32_state_dict_from_zero_checkpoint`:
any ZeRO stage, any rank count, one CPU process). Without ZeRO files (stage 0) the fp32 master copy of
DeepSpeed's fp16/bf16 optimizer is unflattened, or, for plain fp32 training, the module weights are taken as
they are. The result is checked against the module weights stored next to it (master rounded to the training
dtype must equal them), so a consolidation that mixes up parameters cannot go unnoticed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from bert import BertConfig, BertForPreTraining
from bert.hf import HF_FINGERPRINT_FIELD, TIED_KEYS
from common import files
from trainer.checkpoint_files import (CLIENT_KEYS, MODEL_STATES, check_folder_trusted, list_tags, locate,
                                      model_states_file, pick_tag, read_model_states)
from trainer.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunMeta:
    """Where the weights came from and what the pretraining run recorded about them."""

    path: str  # the run directory or HF directory given
    kind: str  # "run" or "hf"
    tokenizer_dir: str
    tokenizer_fingerprint: str  # the fingerprint of the tokenizer the model was pretrained with
    fingerprint_recorded: bool  # False: an HF dir without our field (the dir's own tokenizer is assumed)
    tag: str | None = None
    checkpoint_dir: str | None = None
    step: int | None = None
    max_seq_len: int | None = None
    ds_config: dict | None = None
    consolidation: str = ""  # how fp32 weights were obtained (for the log line)
    client_state: dict = field(default_factory=dict, repr=False)

    def eval_micro_batch(self) -> int | None:
        """The micro batch the run validated with (train_micro_batch_size_per_gpu of its DeepSpeed config)."""
        if not self.ds_config:
            return None
        return self.ds_config.get("train_micro_batch_size_per_gpu")

    def eval_dtype(self) -> str:
        """The precision the run's engine held its module in (its resolved ds_config.json)."""
        from trainer.precision import requested

        return requested(self.ds_config or {})


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "model_config.json"))


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def resolve_tag(checkpoints_dir: str, tag: str | None) -> str:
    """``tag`` if given (it must exist and be complete), else pick_tag's choice (``latest`` when complete)."""
    if not os.path.isdir(checkpoints_dir):
        raise CheckpointError(f"{checkpoints_dir}: no checkpoints directory (has the run saved a checkpoint yet?)")
    if tag is not None and not os.path.isdir(os.path.join(checkpoints_dir, tag)):
        available = list_tags(checkpoints_dir)
        raise CheckpointError(f"{checkpoints_dir}: no checkpoint tag {tag!r} (available tags: "
                              f"{', '.join(available) or 'none'})")
    return pick_tag(checkpoints_dir, tag, lambda m: print(m, file=sys.stderr))


# ---------------------------------------------------------------------------------------------------
# Consolidation


def _unflatten_master(states: dict, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Stage 0 with fp16/bf16: DeepSpeed's FP16_Optimizer keeps one flat fp32 master tensor per param
    group (`fp32_groups_flat`, a plain concatenation in group order, no padding). The group's parameter
    order is `param_shapes` when saved; DeepSpeed leaves it None at stage 0, and then a single group holding
    every parameter is in `model.parameters()` order (what the optimizer was built from). Several groups
    without param_shapes cannot be attributed: None (the caller falls back to the module weights).
    The caller verifies the result against the stored module weights either way."""
    opt = states.get("optimizer")
    if not isinstance(opt, dict) or "fp32_groups_flat" not in opt:
        return None
    flats = opt["fp32_groups_flat"]
    shapes = states.get("param_shapes")
    if not shapes:
        named = list(model.named_parameters())  # tied parameters listed once, as the optimizer saw them
        if len(flats) != 1:
            return _attribute_groups(flats, named, states.get("module") or {})
        if flats[0].numel() != sum(p.numel() for _, p in named):
            return None
        shapes = [{name: p.shape for name, p in named}]
    elif isinstance(shapes, dict):
        shapes = [shapes]
    if len(flats) != len(shapes):
        raise CheckpointError(f"fp32_groups_flat has {len(flats)} groups but param_shapes {len(shapes)}")
    out = {}
    for flat, group in zip(flats, shapes):
        offset = 0
        for name, shape in group.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[offset: offset + n].view(shape).clone().float()
            offset += n
        if offset != flat.numel():
            raise CheckpointError(f"fp32_groups_flat group has {flat.numel()} elements, param_shapes sum to {offset}")
    return out


def _attribute_groups(flats: list[torch.Tensor], named: list, module: dict) -> dict[str, torch.Tensor] | None:
    """Several flat master groups without param_shapes (e.g. weight-decay / no-decay groups at stage 0):
    each group holds its parameters in model order, so walk the model's parameters and give each to the one
    group whose next slice, rounded to the saved module dtype, is exactly the saved module tensor. None when
    that is not unique for some parameter (or sizes do not add up): the caller then uses the module weights."""
    offsets = [0] * len(flats)
    out = {}
    for name, p in named:
        stored = module.get(name)
        if stored is None or stored.numel() != p.numel():
            return None
        n = p.numel()
        fits = [g for g, flat in enumerate(flats) if offsets[g] + n <= flat.numel() and torch.equal(
            flat[offsets[g]: offsets[g] + n].view(stored.shape).to(stored.dtype), stored)]
        if len(fits) != 1:
            return None
        g = fits[0]
        out[name] = flats[g][offsets[g]: offsets[g] + n].view(p.shape).clone().float()
        offsets[g] += n
    if offsets != [flat.numel() for flat in flats]:
        return None
    return out


def consolidate_fp32(checkpoints_dir: str, tag: str, states: dict,
                     model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 state dict of checkpoints_dir/tag (any ZeRO stage, any rank count) and how it was made.
    `model` is a freshly built instance of the checkpoint's architecture (parameter order at stage 0)."""
    ckpt_dir = os.path.join(checkpoints_dir, tag)
    if glob.glob(os.path.join(ckpt_dir, "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_folder_trusted(ckpt_dir)  # DeepSpeed's reader unpickles with weights_only=False

        # DeepSpeed prints progress to stdout; keep stdout for our result lines.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                sd = get_fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag)
            except (ValueError, FileNotFoundError, KeyError) as e:
                raise CheckpointError(f"{ckpt_dir}: cannot consolidate ZeRO checkpoint: {e}") from None
        n_files = len(glob.glob(os.path.join(ckpt_dir, "*_optim_states.pt")))
        return {k: v.float() for k, v in sd.items()}, f"zero_to_fp32 ({n_files} rank file(s))"
    master = _unflatten_master(states, model)
    if master is not None:
        return master, "fp32 master of DeepSpeed's fp16/bf16 optimizer (stage 0)"
    module = states.get("module")
    if not isinstance(module, dict) or not module:
        raise CheckpointError(f"{ckpt_dir}: no ZeRO optimizer files and no module weights in {MODEL_STATES}")
    dtypes = {v.dtype for v in module.values() if v.is_floating_point()}
    if dtypes != {torch.float32}:
        log.warning("%s: module weights are %s and no fp32 master copy was saved; upcasting",
                    ckpt_dir, sorted(map(str, dtypes)))
    return {k: v.float() for k, v in module.items()}, "module weights (stage 0)"


def _check_against_module(sd: dict[str, torch.Tensor], states: dict, where: str) -> None:
    """fp32 master rounded to the stored module's dtype must equal the module weights (stages 0-2 store
    full module tensors; ZeRO-3 stores empty placeholders, which are skipped)."""
    module = states.get("module") or {}
    bad = []
    for name, stored in module.items():
        if name not in sd or stored.numel() == 0 or stored.numel() != sd[name].numel():
            continue
        if not torch.equal(sd[name].to(stored.dtype).view(stored.shape), stored):
            bad.append(name)
    if bad:
        raise CheckpointError(f"{where}: consolidated fp32 weights disagree with the saved module weights for "
                              f"{len(bad)} tensor(s), e.g. {bad[:3]}; the checkpoint is inconsistent")


def load_state_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load after filling tied aliases (checkpoints store one name per shared tensor)."""
    sd = dict(sd)
    expected = set(model.state_dict())
    for alias, target in TIED_KEYS.items():
        if alias in expected and alias not in sd and target in sd:
            sd[alias] = sd[target]
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: checkpoint does not match {type(model).__name__}:\n"
                              f"  missing keys: {missing}\n  unexpected keys: {unexpected}")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------------
# Entry points


def load_run(run_dir: str, tag: str | None = None):
    """(BertForPreTraining in fp32 eval mode, BertTokenizer, RunMeta) from a training run directory."""
    from data.tokenizer import load_tokenizer

    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir}: not a directory (expected a training run directory)")
    checkpoints_dir = os.path.join(run_dir, "checkpoints")
    tag = resolve_tag(checkpoints_dir, tag)
    ckpt_dir = os.path.join(checkpoints_dir, tag)
    states = read_model_states(ckpt_dir)

    cfg_path = os.path.join(run_dir, "model_config.json")
    if os.path.isfile(cfg_path):
        cfg_dict = files.read_json(cfg_path, "BertConfig of the run")
    elif isinstance(states.get("model_config"), dict):
        cfg_dict = states["model_config"]
    else:
        raise CheckpointError(f"{cfg_path}: missing, and the checkpoint's client_state has no model_config")
    try:
        config = BertConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None

    ds_path = os.path.join(run_dir, "ds_config.json")
    ds_config = files.read_json(ds_path, "DeepSpeed config") if os.path.isfile(ds_path) else states.get("ds_config")

    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    recorded = states.get("tokenizer_fingerprint")
    if recorded is None:
        raise CheckpointError(f"{model_states_file(ckpt_dir)}: client_state has no tokenizer_fingerprint")
    if tokenizer.fingerprint != recorded:
        raise CheckpointError(f"{tok_dir}: tokenizer fingerprint {tokenizer.fingerprint} differs from the one the "
                              f"checkpoint was trained with ({recorded}); the run's tokenizer/ was replaced")

    model = BertForPreTraining(config)
    sd, how = consolidate_fp32(checkpoints_dir, tag, states, model)
    _check_against_module(sd, states, ckpt_dir)
    load_state_into(model, sd, ckpt_dir)
    model.eval()

    meta = RunMeta(path=run_dir, kind="run", tokenizer_dir=tok_dir, tokenizer_fingerprint=recorded,
                   fingerprint_recorded=True, tag=tag, checkpoint_dir=ckpt_dir, step=states.get("step"),
                   max_seq_len=states.get("max_seq_len"), ds_config=ds_config, consolidation=how,
                   client_state={k: states[k] for k in CLIENT_KEYS if k in states})
    return model, tokenizer, meta


def load_hf(hf_dir: str):
    """(BertForPreTraining, BertTokenizer, RunMeta) from an HF directory (ours via export_hf, or Google's).
    The pretraining fingerprint is tokenizer_config.json's `bert_fingerprint` when we exported it;
    otherwise the directory's own tokenizer is all there is and it is taken as the pretraining one."""
    from bert.hf import from_hf
    from data.tokenizer import load_tokenizer

    hf_dir = os.fspath(hf_dir)
    try:
        model = from_hf(hf_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    tokenizer = load_tokenizer(hf_dir)
    tc_path = os.path.join(hf_dir, "tokenizer_config.json")
    recorded = None
    if os.path.isfile(tc_path):
        recorded = files.read_json(tc_path, "tokenizer config").get(HF_FINGERPRINT_FIELD)
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise CheckpointError(f"{hf_dir}: tokenizer files have fingerprint {tokenizer.fingerprint} but "
                              f"{tc_path} records the pretraining tokenizer as {recorded}; the files were replaced")
    model.eval()
    meta = RunMeta(path=hf_dir, kind="hf", tokenizer_dir=hf_dir,
                   tokenizer_fingerprint=recorded or tokenizer.fingerprint,
                   fingerprint_recorded=recorded is not None, consolidation="hf safetensors")
    return model, tokenizer, meta


def load_pretrained(path: str, tag: str | None = None):
    """A run directory or an HF directory, whichever `path` is."""
    path = os.fspath(path)
    if is_run_dir(path):
        return load_run(path, tag)
    if tag is not None:
        raise CheckpointError(f"{path}: --tag applies to run directories only (this is not one)")
    if is_hf_dir(path):
        return load_hf(path)
    raise CheckpointError(f"{path}: neither a run directory (checkpoints/, model_config.json) nor a "
                          f"Hugging Face directory (config.json)")


def load_weights(model: torch.nn.Module, init_from: str) -> dict:
    """Consolidated fp32 weights of a checkpoint (any ZeRO stage) into ``model``; returns its client state.
    Only the weights: optimizer, step, data position and RNG start fresh (phase 2 from phase 1)."""
    if init_from in ("auto", "none"):
        raise ConfigError(f"train.init_from={init_from!r} is not a checkpoint path")
    load_dir, tag = locate(init_from)
    try:
        tag = pick_tag(load_dir, tag, log.warning)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from={init_from}: {e}") from None
    states = read_model_states(os.path.join(load_dir, tag))
    sd, _how = consolidate_fp32(load_dir, tag, states, model)
    try:
        load_state_into(model, sd, f"train.init_from {load_dir}/{tag}")
    except RuntimeError as e:  # shape mismatches: the model config differs from the checkpoint's
        raise ConfigError(f"train.init_from {load_dir}/{tag}: weights do not fit the model: {e}") from None
    except CheckpointError as e:
        raise ConfigError(f"{e} (model config differs?)") from None
    states.pop("module", None)
    return states
