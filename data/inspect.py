"""Audit a shard folder: decoded examples the way a person debugs them, and statistics; or verify every shard.

    python -m data.inspect PATH [--split train|valid|all] [--n 3] [--limit N] [--json]
    python -m data.inspect PATH --verify [--json]

``--verify``: one pass over every shard of both splits against the manifest (sample count, every record
within the manifest's limits, token total) with the reader and checks training uses; lists the damaged shards
and exits 1 if there are any, so a damaged copy is found before a run (the run would skip and count exactly the
same samples, data/health.py; ``--json`` lists the corrupt keys).

Statistics (over all examples of the split, or the first --limit): example count, length histogram,
share of short examples and of short target draws, masked positions per example vs Google's formula,
the realised 80/10/10 [MASK]/kept/random split, NSP balance, layout errors, tokenizer fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from data import shards
from common.errors import DataError, run_main
from data.pretraining import Params, num_to_predict
from data.tokenizer import load_tokenizer


def compute_stats(examples, manifest: dict, mask_id: int, cls_id: int, sep_id: int) -> dict:
    st = manifest["settings"]
    p = Params(max_seq_len=st["max_seq_len"], max_predictions=st["max_predictions"],
               masked_lm_prob=st["masked_lm_prob"])
    max_len = st["max_seq_len"]
    lens, npred, nsp = [], [], []
    n_mask = n_kept = n_rand = 0
    layout_errors = 0
    for ex in examples:
        ids, seg, pos, lab = ex["input_ids"], ex["segment_ids"], ex["masked_lm_positions"], ex["masked_lm_ids"]
        n = len(ids)
        lens.append(n)
        npred.append(len(pos))
        nsp.append(ex["next_sentence_label"])
        sep = int(np.argmax(seg)) - 1
        restored = ids.copy()
        restored[pos] = lab
        if (n > max_len or restored[0] != cls_id or restored[sep] != sep_id or restored[-1] != sep_id
                or np.count_nonzero(restored == sep_id) < 2 or seg[0] != 0 or seg[-1] != 1):
            layout_errors += 1
        at = ids[pos]
        m = at == mask_id
        k = (at == lab) & ~m
        n_mask += int(m.sum())
        n_kept += int(k.sum())
        n_rand += int(len(pos) - m.sum() - k.sum())
    count = len(lens)
    if count == 0:
        return {"examples": 0}
    lens_a = np.asarray(lens)
    npred_a = np.asarray(npred)
    formula = num_to_predict(lens_a, p.max_predictions, p.masked_lm_prob)
    edges = np.linspace(0, max_len, 9).round().astype(int)
    hist, _ = np.histogram(lens_a, bins=edges)
    total_masked = max(1, n_mask + n_kept + n_rand)
    mst = manifest["stats"]
    return {
        "examples": count,
        "tokens": int(lens_a.sum()),
        "length_mean": float(lens_a.mean()),
        "length_max": int(lens_a.max()),
        "length_histogram": {f"{edges[i] + 1}-{edges[i + 1]}": int(h) for i, h in enumerate(hist)},
        "share_full_length": float((lens_a == max_len).mean()),
        "share_shorter_than_half": float((lens_a < max_len / 2).mean()),
        "short_target_draw_share": mst.get("short_target_draws", 0) / max(1, mst.get("target_draws", 0)),
        "masked_per_example_mean": float(npred_a.mean()),
        "masked_formula_mean": float(formula.mean()),
        "masked_equal_formula_share": float((npred_a == formula).mean()),
        "masked_above_formula": int((npred_a > formula).sum()),
        "mask_share": n_mask / total_masked,
        "kept_share": n_kept / total_masked,
        "random_share": n_rand / total_masked,
        "nsp_random_next_share": float(np.mean(nsp)),
        "layout_errors": layout_errors,
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
    }


def render_example(ex: dict, tok) -> str:
    ids, pos, lab = ex["input_ids"], ex["masked_lm_positions"], ex["masked_lm_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    targets = dict(zip(pos.tolist(), lab.tolist()))
    shown = []
    for i, t in enumerate(toks):
        if i in targets:
            orig = tok.id_to_token(targets[i])
            kind = "" if ids[i] == tok.mask_id else ("=" if ids[i] == targets[i] else "~")
            shown.append(f"{t}{kind}{{{orig}}}" if kind != "=" else f"{t}{{=}}")
        else:
            shown.append(t)
    sep = int(np.argmax(ex["segment_ids"]))
    label = ex["next_sentence_label"]
    lines = [
        f"--- {ex['__key__']}: {len(ids)} tokens, {len(pos)} targets, NSP label {label} "
        f"({'random next' if label else 'is next'})",
        "A: " + " ".join(shown[:sep]),
        "B: " + " ".join(shown[sep:]),
        "targets: " + ", ".join(f"{p}:{tok.id_to_token(ids[p])}->{tok.id_to_token(v)}"
                                for p, v in targets.items()),
        "(legend: [MASK]{orig} masked, tok{=} kept, tok~{orig} random replacement)",
    ]
    return "\n".join(lines)


def verify(path: str, progress: bool = True) -> list[dict]:
    """Every shard of a folder against its manifest entry: [{"split", "name", "samples", "expected",
    "corrupt", "tokens", "problems"}], problems empty for a sound shard."""
    m = shards.read_manifest(path)
    limits = shards.sample_limits(m)
    todo = [(s, p, sh) for s in shards.SPLITS for p, sh in zip(shards.shard_paths(path, s), m["splits"][s]["shards"])]
    from tqdm import tqdm

    rows = []
    for split, p, sh in tqdm(todo, desc="verify", unit=" shards", disable=not progress, file=sys.stderr):
        rows.append({"split": split, "name": sh["name"], "expected": sh["samples"],
                     **shards.verify_shard(p, sh, limits)})
    return rows


def _verify_main(a) -> int:
    rows = verify(a.path, progress=not a.json)
    bad = [r for r in rows if r["problems"]]
    if a.json:
        print(json.dumps({"shards": len(rows), "damaged": bad}, indent=2))
    else:
        for r in bad:
            print(f"{r['name']}: {'; '.join(r['problems'])}")
        samples = sum(r["expected"] for r in rows)
        lost = sum(r["expected"] - min(r["samples"], r["expected"]) + r["corrupt"] for r in bad)
        print(f"verified {len(rows)} shards of {a.path} ({samples} samples): "
              + (f"{len(bad)} damaged, {lost} samples lost" if bad else "all sound"))
    return 1 if bad else 0


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="shard folder (with manifest.json)")
    ap.add_argument("--split", default="train", choices=("train", "valid", "all"))
    ap.add_argument("--n", type=int, default=3, help="examples to print")
    ap.add_argument("--limit", type=int, default=None, help="statistics over the first N examples")
    ap.add_argument("--json", action="store_true", help="machine-readable statistics only")
    ap.add_argument("--verify", action="store_true", help="check every shard against the manifest (exit 1: damaged)")
    a = ap.parse_args(argv)
    if a.verify:
        return _verify_main(a)
    m = shards.read_manifest(a.path)
    tok_dir = os.path.join(a.path, "tokenizer")
    tok = load_tokenizer(tok_dir)
    if tok.fingerprint != m["tokenizer"]["fingerprint"]:
        raise DataError(f"{tok_dir}: tokenizer fingerprint {tok.fingerprint} != manifest "
                        f"{m['tokenizer']['fingerprint']}")
    splits = ("train", "valid") if a.split == "all" else (a.split,)
    shown: list[dict] = []

    def examples():
        k = 0
        for s in splits:
            for ex in shards.iter_examples(a.path, s):
                if a.limit is not None and k >= a.limit:
                    return
                if len(shown) < a.n:
                    shown.append(ex)
                k += 1
                yield ex

    stats = compute_stats(examples(), m, tok.mask_id, tok.cls_id, tok.sep_id)
    stats["split"] = a.split
    stats["manifest_examples"] = sum(m["splits"][s]["samples"] for s in splits)
    if a.json:
        print(json.dumps(stats, indent=2))
        return 0
    for ex in shown:
        print(render_example(ex, tok))
    print(f"=== {a.path} [{a.split}] tokenizer {stats.get('tokenizer_fingerprint')} vocab "
          f"{m['tokenizer']['vocab_size']}")
    if not stats["examples"]:
        print("no examples")
        return 0
    print(f"examples {stats['examples']} (manifest {stats['manifest_examples']}), tokens "
          f"{stats['tokens']}, mean length {stats['length_mean']:.1f}, max {stats['length_max']}")
    print("length histogram: " + "  ".join(f"{k}:{v}" for k, v in stats["length_histogram"].items()))
    print(f"full-length {stats['share_full_length']:.1%}, shorter than half "
          f"{stats['share_shorter_than_half']:.1%}, short target draws "
          f"{stats['short_target_draw_share']:.1%} (short_seq_prob {m['settings']['short_seq_prob']})")
    print(f"masked per example {stats['masked_per_example_mean']:.2f} vs formula "
          f"{stats['masked_formula_mean']:.2f} (equal in {stats['masked_equal_formula_share']:.1%}, "
          f"above {stats['masked_above_formula']})")
    print(f"[MASK] {stats['mask_share']:.1%} / kept {stats['kept_share']:.1%} / random "
          f"{stats['random_share']:.1%} (target 80/10/10)")
    print(f"NSP random next {stats['nsp_random_next_share']:.1%}; layout errors {stats['layout_errors']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
