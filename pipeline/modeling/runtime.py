"""Where and how the model stages compute: device, precision, threads, loader workers.

``device: auto`` takes CUDA when present, else the CPU, with the same code. bf16 autocast
is used where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or
AMX); elsewhere it would be slower than fp32, so fp32 is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    workers: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device when enabled, else a no-op."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Move an image batch to the device in channels_last, the faster layout for convnets."""
        return batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )


def cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch.backends, "cpu", None)
    capability = cpu.get_cpu_capability() if cpu is not None else ""
    if "AVX512" in capability:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                flags = fh.read()
            return "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            return False
    return False


def resolve(device: str, precision: str) -> Runtime:
    """Turn the ``device`` and ``*.precision`` settings into a concrete runtime."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.info("device: auto found no CUDA device; running on the CPU")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: cuda was asked for, but torch sees no CUDA device (use device: auto)"
        )
    dev = torch.device(device)
    if precision == "auto":
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
    else:
        bf16 = precision == "bf16"
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    if dev.type == "cpu":
        torch.set_num_threads(cores)
        workers = 1 if cores <= 2 else min(4, cores // 2)
    else:
        # cudnn.benchmark stays off: it re-tunes every new batch shape (each split's last
        # batch), which cost more than the whole features stage on an H100.
        workers = min(16, cores)
    runtime = Runtime(dev, bf16, workers)
    log.info(
        "runtime: %s, %s, %d loader workers, %d threads",
        dev,
        "bf16 autocast" if bf16 else "fp32",
        workers,
        torch.get_num_threads(),
    )
    return runtime
