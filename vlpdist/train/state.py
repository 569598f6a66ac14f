"""The one resumable training state (Meta Lingua's TrainState habit) and the RNG states beside it."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run needs to continue exactly."""

    step: int = 0
    """Optimizer steps applied (a step skipped for a non-finite loss does not count)."""
    data_position: int = 0
    """Micro-batches this rank has consumed from its stream under the current data plan (the loader resumes right after)."""
    plan_first_epoch: int = 0
    """The epoch the current data plan started at (0, or later after a re-plan on resume)."""
    samples_seen: int = 0
    """Training samples consumed over all ranks (those of skipped steps included)."""
    nan_skipped: int = 0
    """Optimizer steps skipped because a loss was not finite on some rank."""
    overflow_skipped: int = 0
    """Optimizer steps DeepSpeed skipped for non-finite gradients while every loss was finite (fp16 loss-scale calibration)."""
    consecutive_nan: int = 0
    """Skipped steps in a row right now (reset by an applied one)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        known = {field.name for field in fields(cls)}
        return cls(**{key: int(value) for key, value in values.items() if key in known})


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), Python and NumPy RNG states, as plain tensors/lists (loadable with weights_only)."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [numpy_name, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
