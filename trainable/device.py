"""Where and in what precision a run computes: decided here, once."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32
    channels_last: bool
    cpus: int  # CPUs this process may use

    def loader_workers(self, configured: int | None) -> int:
        """DataLoader processes: as configured, or by default none on the CPU (the model needs
        every core, and augmenting is far faster than training there) and all CPUs but the
        feeding one on a GPU. The rates behind this: docs/performance.md."""
        if configured is not None:
            return configured
        return max(1, self.cpus - 1) if self.device.type == "cuda" else 0

    def augments_on_device(self, configured: str) -> bool:
        """Whether training batches are augmented on the device (`data.augment_on`): as
        configured, or by default (`auto`) on a GPU only. A GPU trains faster than a few
        albumentations processes can feed it, while on a CPU the DataLoader path already runs
        far faster than the model (the rates: docs/performance.md)."""
        return configured == "gpu" or (configured == "auto" and self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return images.to(self.device, non_blocking=True, memory_format=memory_format)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def available_cpus() -> int:
    """OMP_NUM_THREADS when set (Ray sets it to the CPUs a task or trial was given), else the
    CPUs this process may run on."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 \
        else len(os.sched_getaffinity(0))


def select_runtime(device: torch.device | str | None = None,
                   cudnn_benchmark: bool | str = "auto") -> Runtime:
    """CUDA when present, with bf16 autocast and channels_last (tensor cores want both);
    otherwise the CPU in float32, where bf16 would be slower and less exact.
    `cudnn_benchmark` (train.cudnn_benchmark): auto is on, as every batch has the same shape
    (32x32 images), so cuDNN's one-off search per process usually pays for itself."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpus = available_cpus()
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = cudnn_benchmark in (True, "auto")
        return Runtime(device, torch.bfloat16, channels_last=True, cpus=cpus)
    return Runtime(device, None, channels_last=False, cpus=cpus)
