"""Model FLOPs utilisation: training FLOPs per second over the devices' matmul peak (trainer.metrics)."""

from __future__ import annotations

from trainer.callbacks.base import Callback
from trainer.metrics import step_flops


class MFU(Callback):
    """``tflops`` (achieved, all ranks) and ``mfu`` (over ``peak_tflops`` x world). The FLOPs of a micro-batch
    come from the loader's host counts (tokens, predictions), so counting them reads nothing from the device."""

    def on_step_end(self, trainer, batches, window) -> None:
        fc = trainer.info.flops
        flops = 0.0
        for b in batches:
            if not b["is_padding"]:
                n_seq, seq_len = b["input_ids"].shape
                flops += step_flops(fc, b["tokens"], b["predictions"], n_seq, seq_len)
        window.add({"flops": flops})

    def on_log(self, trainer, record, sums, elapsed) -> None:
        record["tflops"] = sums.get("flops", 0.0) / max(elapsed, 1e-9) / 1e12
        record["mfu"] = record["tflops"] / (trainer.info.peak_tflops * trainer.info.world)
