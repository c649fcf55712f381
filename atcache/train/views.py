"""Where each pixel of an augmented training image came from: a small tree of views.

A view describes an image in pixel-index coordinates (pixel (i, j) has its centre at x=j, y=i, as OpenCV's warps use):
    Source(row, shape)       the resized (long side = imgsz) image of cache row `row`, before any letterbox
    Canvas(shape, children)  children painted in order onto an empty canvas; each child's 3x3 matrix maps its pixels
                             to canvas pixels (mosaic tiles, affine/perspective warps, flips, letterbox)
    Blend(shape, parts)      children of the canvas size mixed with weights (MixUp)
The transforms record these trees (`transforms.py`); the warp renderer (`render.py`, the only one) flattens them and
renders the targets they describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np


@dataclass(frozen=True)
class Source:
    """The resized image of one cache row, shape (h, w)."""

    row: int
    shape: tuple[int, int]


@dataclass(frozen=True)
class Placed:
    """A child view and the 3x3 matrix that maps its pixel coordinates to its parent's."""

    view: "View"
    matrix: np.ndarray


@dataclass(frozen=True)
class Canvas:
    """Children painted in order onto an empty (h, w) canvas; later children cover earlier ones."""

    shape: tuple[int, int]
    children: tuple[Placed, ...]
    tag: str = ""  # which augmentation made it: mosaic, affine, flip, letterbox ('' when unknown)


@dataclass(frozen=True)
class Blend:
    """Children of this (h, w) mixed pixel-wise with the given weights (MixUp)."""

    shape: tuple[int, int]
    parts: tuple[tuple["View", float], ...]


View = Union[Source, Canvas, Blend]


def translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def resize_matrix(src_shape: tuple[int, int], dst_shape: tuple[int, int]) -> np.ndarray:
    """cv2.resize from (h, w) to (h', w') in pixel-index coordinates: x' = (x + 0.5) * w'/w - 0.5."""
    sx, sy = dst_shape[1] / src_shape[1], dst_shape[0] / src_shape[0]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def flip_matrix(shape: tuple[int, int], direction: str) -> np.ndarray:
    """np.fliplr / np.flipud of an (h, w) image: x' = w - 1 - x or y' = h - 1 - y."""
    h, w = shape
    if direction == "horizontal":
        return np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, h - 1.0], [0.0, 0.0, 1.0]])


def warp(view: View, matrix: np.ndarray, shape: tuple[int, int], tag: str = "") -> Canvas:
    """`view` moved onto a new (h, w) canvas by a 3x3 matrix (affine or perspective)."""
    return Canvas(tuple(int(s) for s in shape), (Placed(view, np.asarray(matrix, dtype=np.float64)),), tag)
