"""How long a piece of work takes: wall-clock and CPU time, with the GPU's queued work counted in."""

from __future__ import annotations

import time
from typing import Callable

import torch


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall-clock seconds, CPU seconds of this process) that `fn` took, and what it returned."""
    _synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def _synchronize(device: torch.device) -> None:
    """Wait for the work CUDA has queued (kernels run asynchronously), so that it falls inside the timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
