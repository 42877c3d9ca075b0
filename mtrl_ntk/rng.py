"""The process-wide random number generators (Python, NumPy, torch CPU, CUDA): seeding and state.

They belong to no object, so this module gives them the ``state_dict`` /
``load_state_dict`` pair every other part of a run has; the trainer composes it
into its own state (``SeedRun.state_dict``), and checkpoints only store the result.
NumPy's key is kept as an int64 tensor so that ``torch.load(weights_only=True)``
reads it back.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed`` (NumPy's SeedSequence.spawn)."""
    children = np.random.SeedSequence(seed).spawn(count)
    return [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in children]


def capture_global_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (and of every CUDA
    device's, if this process has initialised CUDA; asking would initialise it)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_global_rng(state: dict[str, Any]) -> None:
    """Put the global generators back to ``capture_global_rng``'s state (the CUDA devices
    this machine has in common with the saving one)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            print(
                f"mtrl_ntk: warning: the checkpoint has CUDA RNG states of {len(state['cuda'])} "
                f"devices, this machine has {torch.cuda.device_count()}; restoring the common ones",
                file=sys.stderr,
            )
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
