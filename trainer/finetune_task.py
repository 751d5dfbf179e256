"""The task side of sequence-classification fine-tuning (trainer.finetune trains on it): task data, encoding
and batching, and the classifier model in and out.

Tasks: GLUE through `datasets` (`nyu-mll/glue`, needs the hub) or local CSV / TSV / JSONL files with a text
column, an optional second text column and a label column. Labels are mapped to ids deterministically:
GLUE keeps its ClassLabel ids; local labels are sorted (numerically when every label is an integer,
otherwise as strings) and the dev set must only use labels seen in training.

Model: BertForSequenceClassification ([CLS] pooled output -> dropout -> linear), encoder and pooler copied
from the pretrained BertForPreTraining, classifier head freshly initialised (normal(0, 0.02), seeded). Our
format of a fine-tuned model (``save_classifier`` / ``load_classifier``): model.safetensors fp32,
classifier_config.json, tokenizer/; ``export_classifier_hf`` writes transformers' layout.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch

from bert import BertConfig, BertForSequenceClassification
from common import files
from data.loader import padded_length
from trainer import dist
from trainer.config import FinetuneConfig
from trainer.errors import FinetuneError

# GLUE classification tasks: name -> (first text column, second text column or None, dev split).
# STS-B is regression and is not offered.
GLUE_TASKS = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
}
CLASSIFIER_CONFIG = "classifier_config.json"


# ----------------------------------------------------------------------------------------------
# Task data


@dataclass
class Split:
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    name: str
    train: Split
    dev: Split
    label_names: list[str]

    @property
    def paired(self) -> bool:
        return self.train.text_b is not None


def _sorted_labels(values: set[str]) -> list[str]:
    """Deterministic label order: numeric when every label is an integer ("0" < "2" < "10"), else by string."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _read_rows(path: str) -> tuple[list[dict], list[str]]:
    """Rows (dicts) and column names of a .csv / .tsv / .jsonl file."""
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            # TSV (GLUE's format) has unescaped quotes inside sentences: no quoting there.
            reader = (csv.DictReader(f) if ext == ".csv"
                      else csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            columns = list(reader.fieldnames or [])
            rows = list(reader)
            for n, row in enumerate(rows, 2):  # line 1 is the header
                if None in row or any(v is None for v in row.values()):
                    raise FinetuneError(f"{path}: line {n}: has {len(row) - (None in row)} fields where the "
                                        f"header has {len(columns)}")
            return rows, columns
        if ext in (".jsonl", ".json"):
            rows = files.read_jsonl(path, "data file")
            return rows, list(dict.fromkeys(k for row in rows for k in row))  # columns in order of appearance
    raise FinetuneError(f"{path}: unknown file type {ext!r}; expected .csv, .tsv or .jsonl")


@dataclass
class Columns:
    text: str = "text"
    text_b: str | None = "text_b"
    label: str = "label"
    text_b_explicit: bool = False  # the user named text_b: then it must exist


def _read_split(path: str, cols: Columns) -> tuple[list[str], list[str] | None, list[str]]:
    rows, columns = _read_rows(path)
    if not rows:
        raise FinetuneError(f"{path}: no rows")
    for name, what in ((cols.text, "--text-column"), (cols.label, "--label-column")):
        if name not in columns:
            raise FinetuneError(f"{path}: no column {name!r} (columns: {columns}); choose one with {what}")
    use_b = cols.text_b is not None and cols.text_b in columns
    if cols.text_b_explicit and not use_b:
        raise FinetuneError(f"{path}: no column {cols.text_b!r} (columns: {columns}) given by --text-b-column")
    a, b, labels = [], [] if use_b else None, []
    first_line = 2 if path.lower().endswith((".csv", ".tsv")) else 1
    for n, row in enumerate(rows, first_line):
        text = row.get(cols.text)
        if not isinstance(text, str) or not text.strip():
            raise FinetuneError(f"{path}: row {n}: column {cols.text!r} is empty or not text ({text!r})")
        a.append(text)
        if use_b:
            tb = row.get(cols.text_b)
            if not isinstance(tb, str) or not tb.strip():
                raise FinetuneError(f"{path}: row {n}: column {cols.text_b!r} is empty or not text ({tb!r})")
            b.append(tb)
        label = row.get(cols.label)
        if label is None or str(label).strip() == "":
            raise FinetuneError(f"{path}: row {n}: column {cols.label!r} is empty")
        labels.append(str(label).strip())
    return a, b, labels


def load_local_task(train_path: str, dev_path: str, cols: Columns) -> TaskData:
    """Local CSV/TSV/JSONL train + dev files -> TaskData with deterministic label ids."""
    ta, tb, tl = _read_split(train_path, cols)
    da, db, dl = _read_split(dev_path, cols)
    if (tb is None) != (db is None):
        has, lacks = (train_path, dev_path) if tb is not None else (dev_path, train_path)
        raise FinetuneError(f"{has} has a {cols.text_b!r} column but {lacks} does not; both or neither")
    names = _sorted_labels(set(tl))
    if len(names) < 2:
        raise FinetuneError(f"{train_path}: column {cols.label!r} has only one label value {names}")
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(dl) - set(ids))
    if unknown:
        raise FinetuneError(f"{dev_path}: labels {unknown} do not occur in {train_path} (labels: {names})")
    name = os.path.splitext(os.path.basename(train_path))[0]
    return TaskData(name=name, label_names=names,
                    train=Split(ta, tb, [ids[x] for x in tl]), dev=Split(da, db, [ids[x] for x in dl]))


def load_glue_task(name: str) -> TaskData:  # pragma: no cover - needs the Hugging Face hub
    """GLUE task `name` from the hub (`nyu-mll/glue`); label ids are GLUE's own ClassLabel ids."""
    if name not in GLUE_TASKS:
        raise FinetuneError(f"unknown task {name!r}; GLUE classification tasks: {', '.join(GLUE_TASKS)} "
                            f"(or use --train/--dev with local files)")
    import datasets

    col_a, col_b, dev_split = GLUE_TASKS[name]
    try:
        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as e:  # network/hub errors come in many types; the message is what matters
        raise FinetuneError(f"cannot load GLUE task {name!r} from the hub ({type(e).__name__}: {e}); "
                            f"offline, pass --train/--dev files instead") from None
    label_names = list(ds["train"].features["label"].names)

    def split(part) -> Split:
        return Split(list(part[col_a]), list(part[col_b]) if col_b else None, [int(x) for x in part["label"]])

    return TaskData(name=name, train=split(ds["train"]), dev=split(ds[dev_split]), label_names=label_names)


# ----------------------------------------------------------------------------------------------
# Encoding and batching


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode_split(tokenizer, split: Split, max_len: int) -> Encoded:
    ids, types = [], []
    for i in range(len(split)):
        a, t = tokenizer.encode_pair(split.text_a[i], split.text_b[i] if split.text_b is not None else None,
                                     max_length=max_len)
        ids.append(a)
        types.append(t)
    return Encoded(ids, types, list(split.labels))


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict:
    """Pad the chosen examples to the batch's longest, rounded up to a multiple of 8."""
    S = padded_length(max(len(data.input_ids[i]) for i in indices))
    B = len(indices)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
    token_type_ids = torch.zeros((B, S), dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros((B, S), dtype=torch.long)  # (B, S), 1 = real token
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        token_type_ids[row, :n] = torch.tensor(data.token_type_ids[i])
        attention_mask[row, :n] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels}


def train_batches(n: int, micro_batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro batches for one epoch: a permutation from (seed, epoch), position p -> rank
    p % world, the last partial round wrapped around so every rank gets the same number of batches
    (ceil(n / world) samples each, as torch's DistributedSampler)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = -(-n // world)
    order += order[: per_rank * world - n]  # wrap: a few samples seen twice when n % world != 0
    mine = order[rank::world]
    return [mine[i: i + micro_batch] for i in range(0, len(mine), micro_batch)]


def dev_batches(n: int, micro_batch: int, rank: int, world: int) -> list[tuple[list[int], list[bool]]]:
    """Disjoint dev shards (index i -> rank i % world), padded with masked copies of example 0 so every
    rank runs the same number of forwards (ZeRO-3 gathers parameters in every forward)."""
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    real = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    return [(mine[i: i + micro_batch], real[i: i + micro_batch]) for i in range(0, per_rank, micro_batch)]


# ----------------------------------------------------------------------------------------------
# Model


def build_classifier(pretrained, num_labels: int, dropout: float, seed: int) -> BertForSequenceClassification:
    """Encoder + pooler from `pretrained` (BertForPreTraining), new head; dropout set on every layer."""
    config = dataclasses.replace(pretrained.config, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)  # the head's init: same on every rank and every run with this seed
    model = BertForSequenceClassification(config, num_labels)
    model.bert.load_state_dict(pretrained.bert.state_dict(), strict=True)
    return model


def save_classifier(model: BertForSequenceClassification, out_dir: str, tokenizer, info: dict) -> None:
    """Our format: model.safetensors (fp32), classifier_config.json, tokenizer/."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_config": model.config.to_dict(), "num_labels": model.num_labels, **info}
    files.write_json(os.path.join(out_dir, CLASSIFIER_CONFIG), cfg)
    tokenizer.save(os.path.join(out_dir, "tokenizer"))


def load_classifier(path: str):
    """(BertForSequenceClassification in eval mode, BertTokenizer, classifier_config dict) from save_classifier."""
    from safetensors.torch import load_file

    from data.tokenizer import load_tokenizer
    from trainer.checkpoint_read import load_state_into

    cfg_path = os.path.join(path, CLASSIFIER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FinetuneError(f"{cfg_path}: missing (not a fine-tuned model directory)")
    with open(cfg_path, encoding="utf-8") as f:
        info = json.load(f)
    model = BertForSequenceClassification(BertConfig.from_dict(info["model_config"]), info["num_labels"])
    load_state_into(model, load_file(os.path.join(path, "model.safetensors")), path)
    return model.eval(), load_tokenizer(os.path.join(path, "tokenizer")), info


def export_classifier_hf(model: BertForSequenceClassification, out_dir: str, tokenizer_dir: str,
                         label_names: list[str], fingerprint: str) -> None:
    """transformers' BertForSequenceClassification layout (bert.hf.to_hf) with num_labels/id2label/label2id."""
    from bert.hf import to_hf

    to_hf(model.float(), out_dir, tokenizer_dir, fingerprint=fingerprint, extra_config={
        "num_labels": len(label_names), "problem_type": "single_label_classification",
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)}})


def check_tokenizer(tokenizer, meta, allow_mismatch: bool, model_vocab: int) -> None:
    if tokenizer.vocab_size > model_vocab:
        raise FinetuneError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_vocab}: "
                            f"ids would be out of range")
    if tokenizer.fingerprint == meta.tokenizer_fingerprint:
        if not meta.fingerprint_recorded:
            print(f"warning: {meta.path} records no pretraining tokenizer fingerprint; assuming its own "
                  f"tokenizer files are the pretraining tokenizer", file=sys.stderr)
        return
    msg = (f"tokenizer mismatch: fine-tuning tokenizer has fingerprint {tokenizer.fingerprint}, the model "
           f"{meta.path} was pretrained with {meta.tokenizer_fingerprint}")
    if not allow_mismatch:
        raise FinetuneError(msg + "; use the pretraining tokenizer (or --allow-tokenizer-mismatch)")
    print(f"warning: {msg}; continuing because of --allow-tokenizer-mismatch", file=sys.stderr)


def load_task(cfg: FinetuneConfig, rank: int) -> TaskData:
    """The configured task: local files, or GLUE (rank 0 downloads first, the others read its cache). Collective."""
    k = cfg.task
    if k.name is None:
        columns = Columns(text=k.text_column, text_b=k.text_b_column or "text_b", label=k.label_column,
                          text_b_explicit=k.text_b_column is not None)
        return load_local_task(k.train, k.dev, columns)
    if rank != 0:  # rank 0 downloads into the datasets cache first; the others then read the cache
        dist.barrier()
    task = load_glue_task(k.name)
    if rank == 0:
        dist.barrier()
    return task
