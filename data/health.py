"""The run's data losses, counted once over all ranks, and the thresholds that stop it.

Two kinds of loss, two counts:

- *corrupt* samples: records that do not decode or break a range of ``data.shards.check_sample``, or whose
  member name is not UTF-8 (each is one rank's position, so the ranks' counts add up), kept per shard;
  ``max_bad_samples`` of them are tolerated over the run;
- *missing* samples: those of a damaged shard (missing, zero-byte, unreadable, not a regular file, compressed,
  truncated, ending early at a garbled header or at a member larger than any record), counted once per shard as the manifest's count minus the samples read, whichever rank
  found it; ``max_bad_fraction`` of the samples of all shards the run has opened, and ``max_bad_shards`` such
  shards, are tolerated.

Every rank holds the same view (the trainer merges the ranks' reports when one of them changed), so every rank
reaches the same verdict at the same step. The view is part of the training checkpoint and continues after
a resume, on any rank count; at a resume the shards with a loss on record are checked again, and those that
were replaced in the meantime lose their record (``forget``): a replaced shard lets the run go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataHealth:
    max_bad_samples: int
    max_bad_fraction: float
    max_bad_shards: int
    opened: dict = field(default_factory=dict)  # shard -> samples (manifest): every shard the run has read
    damaged: dict = field(default_factory=dict)  # shard -> {"problem", "found", "expected"}
    corrupt_by_shard: dict = field(default_factory=dict)  # shard -> corrupt samples, all ranks, whole run
    _base: dict = field(default_factory=dict)  # corrupt_by_shard from before this start (a checkpoint's)

    @property
    def corrupt(self) -> int:
        return sum(self.corrupt_by_shard.values())

    @property
    def missing(self) -> int:
        return sum(d["expected"] - d["found"] for d in self.damaged.values())

    @property
    def fraction(self) -> float:
        return self.missing / max(1, sum(self.opened.values()))

    def add_reports(self, reports: list[dict]) -> None:
        """Every rank's loader report (``PretrainLoader.health_report``, counts since this start): the shards
        opened and damaged (union: a shard every rank read is one) and the corrupt samples (a sum: each is one
        rank's position)."""
        corrupt = dict(self._base)
        for r in reports:
            self.opened.update(r["opened"])
            for name, d in r["damaged"].items():
                self.damaged.setdefault(name, d)
            for name, n in r["corrupt"].items():
                corrupt[name] = corrupt.get(name, 0) + n
        self.corrupt_by_shard = corrupt

    def suspects(self) -> list[str]:
        """The shards with a loss on record (damaged or with corrupt samples)."""
        return sorted(set(self.damaged) | set(self.corrupt_by_shard))

    def forget(self, sound: list[str]) -> None:
        """Drop the losses of shards found sound again (replaced since; ``PretrainLoader.recheck``)."""
        for name in sound:
            self.damaged.pop(name, None)
            self.corrupt_by_shard.pop(name, None)
            self._base.pop(name, None)

    def verdict(self) -> Optional[str]:
        """None while the run may go on; else one message: what is lost, which threshold it passed, the override
        that would let the run continue."""
        shards = sorted(self.damaged)
        listed = "; ".join(f"{n} ({self.damaged[n]['problem']})" for n in shards[:8])
        listed += f"; and {len(shards) - 8} more" if len(shards) > 8 else ""
        read = sum(self.opened.values())
        if self.corrupt > self.max_bad_samples:
            return (f"{self.corrupt} corrupt samples (records that do not decode; the warnings above name shard and "
                    f"key), more than data.max_bad_samples={self.max_bad_samples}. Rebuild the shards they are in, "
                    f"or continue with data.max_bad_samples={self.corrupt}")
        passed = []
        if self.fraction > self.max_bad_fraction:
            passed.append(f"data.max_bad_fraction={self.max_bad_fraction:g}")
        if len(shards) > self.max_bad_shards:
            passed.append(f"data.max_bad_shards={self.max_bad_shards}")
        if not passed:
            return None
        allow = f"data.max_bad_fraction={math.ceil(self.fraction * 1e4) / 1e4:g} data.max_bad_shards={len(shards)}"
        return (f"{self.missing} of the {read} samples of the shards read so far are missing "
                f"({self.fraction:.3%}) in {len(shards)} damaged shard(s), more than {' and '.join(passed)}: {listed}. "
                f"Replace or rebuild those shards (python -m data.inspect SHARDS --verify lists them) and run the "
                f"same command to resume, or let the run continue without them with {allow}")

    def stats(self) -> dict:
        """For the logs (data/...)."""
        return {"corrupt_samples": self.corrupt, "missing_samples": self.missing, "bad_shards": len(self.damaged),
                "missing_fraction": self.fraction, "shards_read": len(self.opened)}

    def state_dict(self) -> dict:
        return {"opened": dict(self.opened), "damaged": dict(self.damaged), "corrupt": dict(self.corrupt_by_shard)}

    def load_state_dict(self, sd: dict) -> None:
        self.opened, self.damaged = dict(sd["opened"]), dict(sd["damaged"])
        self._base = dict(sd["corrupt"])
        self.corrupt_by_shard = dict(self._base)


def shard_budget(n_shards: int, max_bad_shards: Optional[int]) -> int:
    """data.max_bad_shards, or its default: 1% of the split's shards, at least 1."""
    return max_bad_shards if max_bad_shards is not None else max(1, n_shards // 100)
