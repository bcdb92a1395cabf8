"""Counter-based random numbers: the same value for the same (seed, indices), on any worker.

The simulator must draw the same slide however it is cut into tiles, so random choices are keyed by
absolute positions (lattice sites, blocks) instead of being drawn in processing order.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche mix of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MUL1
        x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) that depend only on ``seed``, ``stream`` and the integer ``keys``.

    Parameters
    ----------
    seed
        The slide seed.
    stream
        A small integer that separates independent uses (jitter x, jitter y, occupancy, ...).
    *keys
        Integer arrays (broadcast together) or ints, e.g. lattice indices.

    Returns
    -------
    numpy.ndarray
        float64 array of the broadcast shape of ``keys``.
    """
    h = _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h = _mix64(h ^ np.uint64(stream & 0xFFFFFFFF))
    for key in keys:
        k = np.asarray(key, dtype=np.int64).astype(np.uint64)
        h = _mix64(h ^ k)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def block_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A numpy Generator keyed by the slide seed, a stream number and block indices."""
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, stream] + [k & 0xFFFFFFFFFFFFFFFF for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))
