"""Seeds for the data code: one well-spread seed from several ints, and seeding the global RNGs."""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def mix(*parts: int) -> int:
    """A well-spread 63-bit seed from a tuple of ints (splitmix64 over the parts)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by ``mix(*parts)``."""
    return torch.Generator().manual_seed(mix(*parts))


def _seed_python_numpy(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


def seed_worker(worker_id: int) -> None:
    _seed_python_numpy(torch.initial_seed())  # DataLoader derives it from the loader's (seed, epoch) generator


@contextmanager
def seeded_rngs(seed: int):
    """Seed torch's CPU, Python's and numpy's global RNGs; restore them afterwards."""
    torch_state, py_state, np_state = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    _seed_python_numpy(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
