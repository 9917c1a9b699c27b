"""Checkpoints: written atomically, read back with `weights_only=True` (no pickled code runs).

A training checkpoint holds everything needed to continue bit for bit on CPU: model, optimizer,
scheduler, grad scaler, EMA, epoch, RNG states and the resolved config.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mulcon.errors import CheckpointError
from mulcon.io import atomic_path


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a kill mid-write leaves the previous file intact."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save`.

    Raises:
        CheckpointError: the file is missing, truncated or not a mulcon checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        # Not torch's message: it advises turning weights_only off, which would run the file's code.
        raise CheckpointError(f"{path}: not a mulcon model or checkpoint file (torch.load failed: "
                              f"{type(error).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a mulcon model or checkpoint file (holds a {type(state).__name__})")
    return state


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as types `weights_only` loading accepts."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate((3, tuple(states["python"]), states["python_gauss"]))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
