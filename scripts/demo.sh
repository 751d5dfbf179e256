#!/usr/bin/env bash
# The offline demo (README's main command, after scripts/setup.sh): on a CPU machine without network,
#   1. write a corpus of real English text that ships with this Python: the stdlib's docstrings,
#   2. train a WordPiece tokenizer on it (vocab 8k),
#   3. build seq-128 WebDataset shards (Google's algorithm; ~2% of documents held out for validation),
#   4. pretrain a mini BERT for a few minutes with 2 ranks, ZeRO-2, through the deepspeed launcher.
# Held-out MLM accuracy is printed at step 0 and every 100 steps; it should climb well above its start.
# At the end, launcher/evaluate.py prints two held-out examples as Input / Target / Predicted (what the
# TensorBoard text panel shows) and the metrics table of the last checkpoint.
# Re-running resumes from the last checkpoint (train.resume=auto); `rm -rf demo_out` starts over.
# Extra arguments are passed on as run-config overrides, e.g. `bash scripts/demo.sh train.max_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=demo_out
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if [ ! -s "$OUT/pydocs.txt" ]; then
    echo "demo: [1/4] corpus from this interpreter's stdlib docstrings -> $OUT/pydocs.txt"
    $PY -m data.corpus "$OUT/pydocs.txt"
fi
if [ ! -f "$OUT/tokenizer/tokenizer.json" ]; then
    echo "demo: [2/4] WordPiece tokenizer (vocab 8000) -> $OUT/tokenizer"
    $PY -m data.tokenizer --input "$OUT/pydocs.txt" --out "$OUT/tokenizer" --vocab-size 8000
fi
if [ ! -f "$OUT/shards/manifest.json" ]; then
    echo "demo: [3/4] seq-128 shards -> $OUT/shards"
    $PY -m data.build --input "$OUT/pydocs.txt" --tokenizer "$OUT/tokenizer" --out "$OUT/shards" \
        --max-seq-len 128 --max-predictions 20 --dupe-factor 5 --valid-fraction 0.02 --shard-size 5000 \
        --workers 2 --no-progress
fi
echo "demo: [4/4] pretraining: 2 ranks (CPU, gloo), ZeRO-2, configs/demo.yaml"
# zero2.json is BERT's recipe: 256 sequences per step at peak lr 1e-4. The demo's tiny model takes 64 per
# step (32 per rank x 2 ranks, no accumulation) and needs 10x the lr to leave the "always predict the most
# frequent token" plateau (4.9% accuracy) within a few minutes.
.venv/bin/deepspeed --num_gpus 2 launcher/pretrain.py --deepspeed ds_configs/zero2.json \
    --config configs/demo.yaml ds.train_batch_size=64 ds.optimizer.params.lr=1e-3 "$@"

echo
$PY - "$OUT/run/metrics.jsonl" <<'PYEOF'
import json, sys
val = [r for r in map(json.loads, open(sys.argv[1])) if "val/mlm_acc" in r]
if len(val) >= 2:
    a, b = val[0], val[-1]
    print(f"demo: held-out MLM accuracy {a['val/mlm_acc']:.4f} (step {a['step']}) -> {b['val/mlm_acc']:.4f} "
          f"(step {b['step']}); MLM loss {a['val/mlm_loss']:.3f} -> {b['val/mlm_loss']:.3f}")
PYEOF
echo "demo: what the model learned: two held-out examples of its last checkpoint"
if ! $PY launcher/evaluate.py --checkpoint "$OUT/run" --data "$OUT/shards" --examples 2 \
        >"$OUT/evaluate.out" 2>"$OUT/evaluate.log"; then
    cat "$OUT/evaluate.log" >&2
    exit 1
fi
sed '$d' "$OUT/evaluate.out"  # all but the last line (the JSON record): the examples and the metrics table
echo "demo: run folder    $OUT/run  (config.yaml, ds_config.json, metrics.jsonl)"
echo "demo: checkpoints   $OUT/run/checkpoints  (latest: $(cat "$OUT/run/checkpoints/latest" 2>/dev/null || echo none))"
echo "demo: TensorBoard   .venv/bin/tensorboard --logdir $OUT/run/tensorboard"
