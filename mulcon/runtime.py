"""Where and in what precision tensors are computed: the device and the autocast context.

Training, evaluation and analysis share these; they sit below all of them so that an edit to a
report or plot function never changes (or reruns) training.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; CPU always computes in fp32 (deterministic, and fast enough)."""
    enabled = device.type == "cuda" and precision != "fp32"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)
