"""Export a pretraining checkpoint as a Hugging Face BERT directory.

    python launcher/export_hf.py --checkpoint RUN_DIR [--tag TAG] --out DIR [--force]

Consolidates the (possibly ZeRO-partitioned, multi-rank) checkpoint to fp32 with DeepSpeed's own API,
then writes config.json, model.safetensors, tokenizer.json, vocab.txt, tokenizer_config.json and
special_tokens_map.json, so that `transformers.AutoModelForPreTraining.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it with no missing or unexpected keys. tokenizer_config.json also
records the pretraining tokenizer's fingerprint (`bert_fingerprint`), which launcher/finetune.py checks.

Before finishing, the directory is read back with bert.hf.from_hf and its logits compared with the
consolidated model's on a probe batch, so a broken export fails here rather than downstream.

The directory is written under a temporary name beside DIR and renamed only when the read-back check has
passed: a failed export leaves nothing. An existing DIR is refused before anything is loaded, unless
--force (it is then replaced only once the new export is complete); a DIR that holds the run is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from trainer import launch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


@torch.no_grad()
def verify_roundtrip(model, out_dir: str, tokenizer) -> float:
    """Max |logit difference| between `model` and the exported directory read back (must be 0 in fp32:
    the same tensors go through the same code)."""
    from bert.hf import from_hf

    back = from_hf(out_dir).eval()
    text_a, text_b = "the quick brown fox jumps over the lazy dog.", "a second sentence follows it."
    ids, types = tokenizer.encode_pair(text_a, text_b, max_length=min(64, model.config.max_position_embeddings))
    input_ids, token_type_ids = torch.tensor([ids]), torch.tensor([types])  # (1, S)
    mask = torch.ones_like(input_ids)
    a, b = model(input_ids, token_type_ids, mask), back(input_ids, token_type_ids, mask)
    return max((a.prediction_logits - b.prediction_logits).abs().max().item(),
               (a.seq_relationship_logits - b.seq_relationship_logits).abs().max().item())


def check_target(out: str, run_dir: str, force: bool) -> None:
    """Refuse an output directory that exists (unless ``force``) or that holds the run being exported."""
    from common.errors import UserError

    out, run = os.path.realpath(out), os.path.realpath(run_dir)
    if run == out or run.startswith(out.rstrip(os.sep) + os.sep):
        raise UserError(f"--out {out}: holds the run {run} being exported; choose another folder")
    if os.path.lexists(out) and not force:
        raise UserError(f"--out {out}: exists; choose another folder, or pass --force to replace it once the new "
                        f"export is complete")


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    from bert.hf import to_hf
    from common import files
    from trainer.checkpoint_read import load_run
    from trainer.errors import CheckpointError

    check_target(a.out, a.checkpoint, a.force)
    model, tokenizer, meta = load_run(a.checkpoint, a.tag)
    with files.atomic_dir(a.out, replace=a.force) as tmp:
        try:
            to_hf(model, tmp, tokenizer_dir=meta.tokenizer_dir, fingerprint=meta.tokenizer_fingerprint)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        diff = verify_roundtrip(model, tmp, tokenizer)
        if diff != 0.0:
            raise CheckpointError(f"{a.out}: exported model read back gives logits differing by {diff:g}")
        written = sorted(os.listdir(tmp))
    print(f"exported {meta.checkpoint_dir} (step {meta.step}, weights: {meta.consolidation}) -> {a.out} "
          f"[{', '.join(written)}]; tokenizer {meta.tokenizer_fingerprint}; read-back logits identical; "
          f"{time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(launch.main(main))
