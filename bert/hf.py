"""Hugging Face interop without importing transformers: read and write HF BERT directories.

An HF directory is `config.json` + weights (`model.safetensors`, `pytorch_model.bin`, or a sharded
`*.index.json` of either) + optional tokenizer files. Our module names are HF's (bert/model.py), so the
keys map 1:1; what this file handles is everything around that:

- config.json carries many generic HF keys; only BertConfig fields are taken, and settings our model
  cannot represent (relative position embeddings, decoder/cross-attention, untied output embeddings) are
  refused with an error naming the key.
- Checkpoints of a bare `BertModel` (keys without `bert.`) or of another HF head class (e.g.
  `BertForSequenceClassification`: `bert.*` + `classifier.*`) load into `BertForPreTraining`: heads we
  lack are initialised and reported by name, foreign head keys are dropped and reported.
- Old key names (`LayerNorm.gamma/beta`) and the old persistent `position_ids` buffer are mapped/dropped.
- No `strict=False`: missing/unexpected keys are computed here, and any mismatch in the encoder is a
  ValueError listing the keys.
- safetensors cannot store two names for one tensor, so `to_hf` drops the tied
  `cls.predictions.decoder.weight` (= word embeddings) and `cls.predictions.decoder.bias`
  (= `cls.predictions.bias`), exactly as `save_pretrained` does; HF re-ties them on load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, field

import torch

from common import files
from common.tokenizer_spec import lowercases
from bert.config import BertConfig
from bert.model import BertForPreTraining, BertForSequenceClassification, BertModel

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
# Field of tokenizer_config.json that records the pretraining tokenizer's fingerprint (transformers ignores it;
# fine-tuning refuses a tokenizer whose fingerprint differs).
HF_FINGERPRINT_FIELD = "bert_fingerprint"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"

# HF config keys whose value must be the one our model implements: key -> (accepted values, why).
_REQUIRED_CONFIG_VALUES = {
    "position_embedding_type": ({"absolute"}, "only absolute position embeddings are implemented"),
    "is_decoder": ({False}, "the model is an encoder (no causal mask)"),
    "add_cross_attention": ({False}, "cross-attention layers are not implemented"),
    "tie_word_embeddings": ({True}, "the MLM decoder is always tied to the word embeddings"),
}

# Tied aliases in the state dict: alias -> the tensor it is. Both names exist in our state_dict (and
# HF's), but they are one parameter; checkpoints may carry the alias, omit it, or carry only it.
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

# Our parameters that may be absent from a checkpoint and are then freshly initialised (reported).
# Everything else (bert.embeddings.*, bert.encoder.*) must be present.
_HEAD_PREFIXES = ("cls.", "bert.pooler.")

# Top-level key prefixes of other HF BERT head classes (sequence/token classification, multiple choice,
# question answering): dropped and reported when loading into BertForPreTraining.
_FOREIGN_HEAD_PREFIXES = ("classifier.", "qa_outputs.")

# Buffers that old transformers versions saved as persistent; ours are non-persistent (derived).
_IGNORED_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")

_BARE_PREFIXES = ("embeddings.", "encoder.", "pooler.")


@dataclass
class LoadReport:
    """What `from_hf` did besides copying matching tensors (all lists sorted)."""

    initialized: list[str] = field(default_factory=list)  # our keys absent from the checkpoint
    dropped_heads: list[str] = field(default_factory=list)  # checkpoint keys of heads we do not have
    renamed: dict[str, str] = field(default_factory=dict)  # old name -> new name (gamma/beta, prefix)
    ignored_buffers: list[str] = field(default_factory=list)
    bare_model: bool = False  # the checkpoint was a BertModel without the `bert.` prefix


# ----------------------------------------------------------------------------------------------
# Reading


def _read_config(path: str) -> BertConfig:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no {CONFIG_NAME} (expected a Hugging Face model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"{cfg_path}: model_type is {model_type!r}, expected 'bert'")
    for key, (accepted, why) in _REQUIRED_CONFIG_VALUES.items():
        if key in raw and raw[key] not in accepted:
            raise ValueError(f"{cfg_path}: {key}={raw[key]!r} is not supported ({why}); "
                             f"expected one of {sorted(accepted, key=str)}")
    known = {f.name for f in dataclasses.fields(BertConfig)}
    fields = {k: v for k, v in raw.items() if k in known}
    if fields.get("pad_token_id", 0) is None:
        # HF allows no padding index; ours always has one (it only zeroes that row at init and keeps its
        # gradient zero). Token 0 is [PAD] in every BERT vocabulary.
        log.warning("%s: pad_token_id is null; using 0", cfg_path)
        fields["pad_token_id"] = 0
    ignored = sorted(set(raw) - known - set(_REQUIRED_CONFIG_VALUES))
    log.debug("%s: ignoring HF config keys with no BertConfig field: %s", cfg_path, ", ".join(ignored))
    try:
        return BertConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _load_weight_file(file: str) -> dict[str, torch.Tensor]:
    """safetensors (no code at all), or a pytorch_model.bin read with weights_only=True: tensors and plain
    containers only, so a pickle that names any other callable is refused before anything runs."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(file, device="cpu")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "global" in ln.lower() or "but got" in ln), lines[0] if lines else "")
        raise ValueError(f"{file}: refused or unreadable as plain weights ({type(e).__name__}: {why[:300]})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(sd).__name__}")
    return sd


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin, else a sharded index of either (preferring safetensors)."""
    for name in (SAFETENSORS_NAME, TORCH_NAME):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return _load_weight_file(file)
        index = file + ".index.json"
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            sd = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(_load_weight_file(os.path.join(path, shard)))
            missing = sorted(set(weight_map) - set(sd))
            if missing:
                raise ValueError(f"{index}: keys listed in the index are absent from the shards: {missing}")
            return sd
    raise ValueError(f"{path}: no weights found (expected {SAFETENSORS_NAME} or {TORCH_NAME}, "
                     f"or a sharded *.index.json of either)")


def load_hf_state_dict(path: str) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """Read an HF BERT directory: (our BertConfig, the raw state dict exactly as stored)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (expected a Hugging Face model directory)")
    return _read_config(path), _read_weights(path)


def _normalise_keys(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Old names -> current names; bare BertModel keys -> `bert.`-prefixed; duplicates are an error."""
    report.bare_model = not any(k.startswith("bert.") for k in sd) and any(k.startswith(_BARE_PREFIXES) for k in sd)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new = key
        if new.endswith("LayerNorm.gamma"):
            new = new[: -len("gamma")] + "weight"
        elif new.endswith("LayerNorm.beta"):
            new = new[: -len("beta")] + "bias"
        if report.bare_model:
            new = "bert." + new
        if new in out:
            raise ValueError(f"checkpoint holds two tensors for {new!r} (e.g. both LayerNorm.gamma and .weight)")
        if new != key:
            report.renamed[key] = new
        out[new] = t
    return out


def _resolve_ties(sd: dict[str, torch.Tensor]) -> None:
    """Checkpoints may carry the tied aliases; they must equal their target, since we cannot untie them."""
    for alias, target in TIED_KEYS.items():
        if alias not in sd:
            continue
        t = sd.pop(alias)
        if target not in sd:
            sd[target] = t  # e.g. only decoder.bias stored: it *is* cls.predictions.bias
        elif t.shape != sd[target].shape or not torch.equal(t, sd[target]):
            raise ValueError(f"checkpoint's {alias} differs from {target}; this model always ties them, "
                             f"so an untied output layer cannot be represented")


def from_hf(path: str, *, return_report: bool = False):
    """Load an HF directory (BertForPreTraining, bare BertModel, or another BERT head class) as our
    BertForPreTraining in fp32. Missing heads (pooler, MLM, NSP) are initialised and logged by name,
    foreign head keys are dropped and logged; anything missing or unexpected in the encoder is a
    ValueError listing the keys. With return_report=True returns (model, LoadReport)."""
    path = os.fspath(path)
    config, raw = load_hf_state_dict(path)
    report = LoadReport()
    sd = _normalise_keys(raw, report)
    for key in _IGNORED_BUFFERS:
        if key in sd:
            del sd[key]
            report.ignored_buffers.append(key)
    _resolve_ties(sd)

    model = BertForPreTraining(config)
    own = model.state_dict()  # includes the tied aliases
    expected = {k for k in own if k not in TIED_KEYS}

    report.dropped_heads = sorted(k for k in sd if k not in expected and k.startswith(_FOREIGN_HEAD_PREFIXES))
    unexpected = sorted(k for k in sd if k not in expected and k not in report.dropped_heads)
    missing = sorted(expected - set(sd))
    encoder_missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if unexpected or encoder_missing:
        raise ValueError(f"{path}: checkpoint does not match BertForPreTraining({config}):\n"
                         f"  missing encoder keys: {encoder_missing}\n  unexpected keys: {unexpected}")
    bad_shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in expected & set(sd) if sd[k].shape != own[k].shape]
    if bad_shapes:
        raise ValueError(f"{path}: shape mismatch with config.json:\n  " + "\n  ".join(sorted(bad_shapes)))
    report.initialized = missing

    full = dict(own)  # freshly initialised values for whatever the checkpoint lacks
    full.update({k: sd[k] for k in expected & set(sd)})
    for alias, target in TIED_KEYS.items():
        full[alias] = full[target]
    model.load_state_dict(full, strict=True)  # copies (and casts to fp32) into the tied parameters
    if model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight:
        raise RuntimeError("decoder/word-embedding tie broken by loading")  # load_state_dict copies in place

    if report.initialized:
        log.warning("%s: newly initialised (absent from the checkpoint): %s", path, ", ".join(report.initialized))
    if report.dropped_heads:
        log.warning("%s: dropped head weights this model does not have: %s", path, ", ".join(report.dropped_heads))
    if report.ignored_buffers:
        log.info("%s: ignored stored buffers (derived in this model): %s", path, ", ".join(report.ignored_buffers))
    return (model, report) if return_report else model


# ----------------------------------------------------------------------------------------------
# Writing


def _hf_config(config: BertConfig, architecture: str, dtype: torch.dtype) -> dict:
    d = {"architectures": [architecture], "model_type": "bert"}
    d.update(config.to_dict())
    d.update(tie_word_embeddings=True, is_decoder=False, add_cross_attention=False,
             dtype=str(dtype).removeprefix("torch."))
    return d


def to_hf(model, path: str, tokenizer_dir: str | None = None, *, do_lower_case: bool | None = None,
          fingerprint: str | None = None, extra_config: dict | None = None) -> None:
    """Write `model` (BertForPreTraining, BertModel or BertForSequenceClassification) as an HF directory:
    config.json + model.safetensors (+ tokenizer files from tokenizer_dir, recording `fingerprint`) that
    `transformers.<Class>.from_pretrained(path)` loads with no missing or unexpected keys. do_lower_case
    overrides what is read from the tokenizer files; extra_config adds config.json keys (e.g. labels)."""
    from safetensors.torch import save

    path = os.fspath(path)
    if not isinstance(model, (BertForPreTraining, BertModel, BertForSequenceClassification)):
        raise ValueError(f"to_hf expects BertForPreTraining, BertModel or BertForSequenceClassification, got "
                         f"{type(model).__name__}")
    architecture = type(model).__name__
    sd = model.state_dict()
    for alias in TIED_KEYS:  # one tensor, two names: safetensors refuses shared storage; HF re-ties on load
        sd.pop(alias, None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    dtype = next(model.parameters()).dtype

    os.makedirs(path, exist_ok=True)
    # "pt" marks PyTorch layout for transformers
    files.write_bytes(os.path.join(path, SAFETENSORS_NAME), save(tensors, metadata={"format": "pt"}))
    files.write_json(os.path.join(path, CONFIG_NAME), {**_hf_config(model.config, architecture, dtype),
                                                       **(extra_config or {})})
    if tokenizer_dir is not None:
        write_hf_tokenizer(tokenizer_dir, path, model.config, do_lower_case=do_lower_case, fingerprint=fingerprint)




SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


def _read_tokenizer_dir(tokenizer_dir: str) -> tuple[list[str], bool | None]:
    """(vocabulary in id order, whether it lowercases) of tokenizer_dir: tokenizer.json's WordPiece vocabulary
    and normaliser, else vocab.txt with tokenizer_config.json's do_lower_case (None when that is absent too)."""
    tok_json = os.path.join(tokenizer_dir, "tokenizer.json")
    vocab_txt = os.path.join(tokenizer_dir, "vocab.txt")
    src_config = os.path.join(tokenizer_dir, "tokenizer_config.json")
    lowercase = None
    if os.path.isfile(tok_json):
        with open(tok_json, encoding="utf-8") as f:
            spec = json.load(f)
        model_spec = spec.get("model") or {}
        if model_spec.get("type") != "WordPiece":
            raise ValueError(f"{tok_json}: model.type is {model_spec.get('type')!r}, expected 'WordPiece' (BERT)")
        by_id = sorted(model_spec["vocab"].items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError(f"{tok_json}: vocabulary ids are not 0..{len(by_id) - 1} without gaps")
        vocab = [t for t, _ in by_id]
        lowercase = lowercases(spec.get("normalizer"))
    elif os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        while vocab and vocab[-1] == "":  # trailing newline(s)
            vocab.pop()
    else:
        raise ValueError(f"{tokenizer_dir}: holds neither tokenizer.json nor vocab.txt")
    if os.path.isfile(vocab_txt) and os.path.isfile(tok_json):
        with open(vocab_txt, encoding="utf-8") as f:
            txt = [line.rstrip("\n") for line in f if line.rstrip("\n") != ""]
        if txt != vocab:
            raise ValueError(f"{tokenizer_dir}: vocab.txt and tokenizer.json disagree on the vocabulary")
    if lowercase is None and os.path.isfile(src_config):
        with open(src_config, encoding="utf-8") as f:
            lowercase = json.load(f).get("do_lower_case")
    return vocab, lowercase


def write_hf_tokenizer(tokenizer_dir: str, out_dir: str, config: BertConfig, *,
                       do_lower_case: bool | None = None, fingerprint: str | None = None) -> None:
    """Copy tokenizer.json / vocab.txt from tokenizer_dir and write tokenizer_config.json and
    special_tokens_map.json, so `AutoTokenizer.from_pretrained(out_dir)` is a BERT WordPiece tokenizer
    with the same ids. Needs tokenizer.json (WordPiece) or vocab.txt (one token per line, id order)."""
    tokenizer_dir = os.fspath(tokenizer_dir)
    tok_json = os.path.join(tokenizer_dir, "tokenizer.json")
    vocab, lowercase = _read_tokenizer_dir(tokenizer_dir)
    if do_lower_case is not None:
        lowercase = do_lower_case
    if lowercase is None:
        raise ValueError(f"{tokenizer_dir}: cannot tell whether the tokenizer lowercases (bare vocab.txt); "
                         f"pass do_lower_case=True/False")
    missing = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise ValueError(f"{tokenizer_dir}: special tokens missing from the vocabulary: {missing}")
    if len(vocab) > config.vocab_size:
        raise ValueError(f"{tokenizer_dir}: vocabulary has {len(vocab)} tokens but the model's "
                         f"vocab_size is {config.vocab_size}")
    if vocab.index("[PAD]") != config.pad_token_id:
        raise ValueError(f"{tokenizer_dir}: [PAD] has id {vocab.index('[PAD]')} but the model's "
                         f"pad_token_id is {config.pad_token_id}")

    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(tok_json):
        shutil.copyfile(tok_json, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in vocab))
    files.write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "BertTokenizer",  # transformers picks the fast (tokenizers) implementation
        "do_lower_case": bool(lowercase),
        "tokenize_chinese_chars": True,
        "strip_accents": None,  # follows do_lower_case, as in Google's BERT
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        **SPECIAL_TOKENS,
        **({HF_FINGERPRINT_FIELD: fingerprint} if fingerprint else {}),
    })
    files.write_json(os.path.join(out_dir, "special_tokens_map.json"), dict(SPECIAL_TOKENS))
