"""The random states a training run draws from, as a checkpointable object, so a resumed run draws what an
uninterrupted one would: Python's ``random``, NumPy's global generator, torch's CPU (and CUDA) generators, and the
``RandomState`` of every random transform the training data holds (MONAI's ``DataLoader`` seeds them once, at its
construction, when it loads in the main process; with worker processes they are re-seeded from torch's generator
each epoch, which is restored too).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RandomStates", "SAMPLE_INDEX", "keyed_generators", "random_transforms"]

#: the batch key of each item's position in its data set, which keys that item's draws (:func:`keyed_generators`)
SAMPLE_INDEX = "sample_index"


def keyed_generators(seed: int, epoch: int, indices: Any) -> list[torch.Generator]:
    """One CPU generator per batch item, seeded by ``(seed, epoch, the item's index in its data set)`` through
    NumPy's ``SeedSequence`` (well-mixed, distinct keys give independent streams). What an item draws then depends
    on neither its batch, nor its rank, nor the number of processes: a run gives the same result at any world size.
    """
    generators = []
    for index in torch.as_tensor(indices).reshape(-1).tolist():
        key = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0]
        generators.append(torch.Generator().manual_seed(int(key)))
    return generators


def random_transforms(obj: Any, found: list | None = None, depth: int = 0) -> list:
    """Every object with a ``set_random_state`` method and a ``RandomState`` (MONAI's ``Randomizable``) reachable
    from ``obj`` through attributes, lists and tuples, each once, in a fixed order."""
    found = [] if found is None else found
    if depth > 12:
        return found
    if isinstance(obj, (list, tuple)):
        for item in obj:
            random_transforms(item, found, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, np.ndarray)):
        if any(obj is seen for seen in found):
            return found
        if hasattr(obj, "set_random_state") and isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.append(obj)  # a Compose is random itself and holds random transforms
        for key, value in vars(obj).items():
            if not key.startswith("__") and key != "R":
                random_transforms(value, found, depth + 1)
    return found


def _numpy_state(generator: np.random.RandomState) -> dict:
    _, keys, pos, has_gauss, cached = generator.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _set_numpy_state(generator: np.random.RandomState, state: Mapping) -> None:
    generator.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


class RandomStates:
    """``state_dict``/``load_state_dict`` of the process's random generators and of the random transforms of
    ``data`` (e.g. the training data loader), in a form ``torch.load(..., weights_only=True)`` reads.

    Args:
        data: an object holding random transforms (a ``DataLoader``, a dataset, a ``Compose``); ``None``: only the
            global generators.
    """

    def __init__(self, data: Any = None) -> None:
        self.transforms = random_transforms(data) if data is not None else []

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": _numpy_state(np.random.mtrand._rand),
                 "torch": torch.get_rng_state(), "transforms": [_numpy_state(t.R) for t in self.transforms]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the generators.

        Raises:
            ValueError: the state holds another number of random transforms than ``data`` (another config).
        """
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(f"{len(state['transforms'])} random transforms were saved, the data has "
                             f"{len(self.transforms)}")
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        _set_numpy_state(np.random.mtrand._rand, state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for transform, saved in zip(self.transforms, state["transforms"], strict=True):
            _set_numpy_state(transform.R, saved)
