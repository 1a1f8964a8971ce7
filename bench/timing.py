"""The one throughput measure the bench scripts share."""

from __future__ import annotations

import time
from collections.abc import Callable


def images_per_second(
    run: Callable[[], object], batch: int, repeats: int, warmup: int = 0
) -> float:
    """``batch`` images per call of ``run``: ``warmup`` untimed calls, then ``repeats`` timed."""
    for _ in range(warmup):
        run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - started)
