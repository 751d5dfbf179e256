"""launcher/evaluate.py --examples: held-out examples as Input / Target / Predicted in the terminal, the same text
the run's TensorBoard panel logged for the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def logged_panel(run_dir: str, step: int) -> str:
    """The run's validation text panel at ``step``, read back from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    events = [e for e in acc.Tensors("validation/examples/text_summary") if e.step == step]
    assert len(events) == 1, [e.step for e in acc.Tensors("validation/examples/text_summary")]
    return events[0].tensor_proto.string_val[0].decode("utf-8")


def test_evaluate_prints_the_runs_text_panel(eval_run, train_shards):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, str(REPO / "launcher" / "evaluate.py"), "--checkpoint", eval_run, "--data",
                        train_shards, "--examples", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    panel = logged_panel(eval_run, result["step"])
    # The run's panel shows eval_examples sequences; the first two are what evaluate prints, byte for byte.
    assert result["examples"] == "\n\n---\n\n".join(panel.split("\n\n---\n\n")[:2])
    text = p.stdout[: p.stdout.rindex("\n{")]
    for label in ("Input:", "Target:", "Predicted:"):
        assert text.count(label) == 2, text
    assert "**" not in text and result["examples"].replace("**", "") in text
    assert "[MASK]" in text
