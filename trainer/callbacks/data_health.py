"""The data's health (data.health.DataHealth: samples and shards lost, over every rank) in each log line."""

from __future__ import annotations

from trainer.callbacks.base import Callback


class DataHealthReport(Callback):
    """``data/<name>`` for each of DataHealth.stats() (the totals the ranks agreed on at the last step)."""

    def on_log(self, trainer, record, sums, elapsed) -> None:
        record.update({f"data/{k}": v for k, v in trainer.health.stats().items()})
