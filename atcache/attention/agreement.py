"""How alike two stacks of maps are, in numpy (no torch): inspect --compare, fidelity and bench all use it."""

from __future__ import annotations

import numpy as np


def map_agreement(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per map of two (N, ...) stacks: cosine similarity and AT distance ||A1 - A2||_2, both (N,), in float32."""
    x = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
    y = np.asarray(b, dtype=np.float32).reshape(len(b), -1)
    cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    return cosine, np.linalg.norm(x - y, axis=1)
