"""Where a run's time goes: wall time per named stage, summed over repeats (timing.json)."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict


class StageTimer:
    """`with timer.stage("train_steps"):` adds the block's wall time to that stage; a stage may repeat."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
