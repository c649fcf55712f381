"""Where each pixel of an augmented training image came from: a small tree of views, and resampling through it.

A view describes an image in pixel-index coordinates (pixel (i, j) has its centre at x=j, y=i, as OpenCV's warps use):
    Source(row, shape)       the resized (long side = imgsz) image of cache row `row`, before any letterbox
    Canvas(shape, children)  children painted in order onto an empty canvas; each child's 3x3 matrix maps its pixels
                             to canvas pixels (mosaic tiles, affine/perspective warps, flips, letterbox)
    Blend(shape, parts)      children of the canvas size mixed with weights (MixUp)
Evaluating a view at points returns the value of every point and whether any source covers it; points outside all
sources have value 0 (the grey fill of ultralytics' augmentations carries no cached attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

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
# leaf(source, xy (P, 2) in the source's pixel coordinates) -> values (P,) at points inside the source
Leaf = Callable[[Source, np.ndarray], np.ndarray]
# the same with the grid index (P,) of each point, for render_grids
GridLeaf = Callable[[Source, np.ndarray, np.ndarray], np.ndarray]


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


def inside(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Points whose nearest pixel lies in an (h, w) image."""
    h, w = shape
    x, y = xy[:, 0], xy[:, 1]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def apply_inverse(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map parent points (P, 2) back to the child through the inverse of a 3x3 (possibly perspective) matrix."""
    inv = np.linalg.inv(matrix)
    out = xy @ inv[:2, :2].T + inv[:2, 2]
    if inv[2, 0] or inv[2, 1] or inv[2, 2] != 1.0:
        z = xy @ inv[2, :2] + inv[2, 2]
        out = out / z[:, None]
    return out


def evaluate(view: View, xy: np.ndarray, leaf: Leaf) -> tuple[np.ndarray, np.ndarray]:
    """(values (P,), covered (P,) bool) of `view` at points xy (P, 2) given in the view's pixel coordinates."""
    return _evaluate(view, xy, np.arange(len(xy)), lambda source, pts, _: leaf(source, pts))


def _evaluate(view: View, xy: np.ndarray, ids: np.ndarray, leaf, extend: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """evaluate() that carries each point's original index to the leaf (one walk of the tree serves many grids).

    extend=True lets a Source answer beyond its own image wherever its leaf can (the leaf returns NaN where it
    cannot): how uncovered canvas cells borrow the cached response around the nearest image."""
    values = np.zeros(len(xy), dtype=np.float64)
    covered = np.zeros(len(xy), dtype=bool)
    if isinstance(view, Source):
        if extend:
            v = leaf(view, xy, ids)
            ok = np.isfinite(v)
            values[ok] = v[ok]
            return values, ok
        ok = inside(xy, view.shape)
        if ok.any():
            values[ok] = leaf(view, xy[ok], ids[ok])
        return values, ok
    if isinstance(view, Canvas):
        for placed in view.children:
            pts = apply_inverse(placed.matrix, xy)
            ok = np.ones(len(pts), bool) if extend and isinstance(placed.view, Source) else inside(pts, placed.view.shape)
            if extend:  # borrowing beyond images: the first source that can answer keeps the point
                ok &= ~covered
            if not ok.any():
                continue
            v, c = _evaluate(placed.view, pts[ok], ids[ok], leaf, extend)
            idx = np.flatnonzero(ok)[c]
            values[idx] = v[c]
            covered[idx] = True
        return values, covered
    if isinstance(view, Blend):
        for part, weight in view.parts:
            v, c = _evaluate(part, xy, ids, leaf, extend)
            values += weight * v
            covered |= c
        return values, covered
    raise TypeError(f"not a view: {type(view).__name__}")


def _cell_centres(shape: tuple[int, int], stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixel coordinates (P, 2) of the centres of the stride x stride cells of an (h, w) image, and the grid shape."""
    gh, gw = shape[0] // stride, shape[1] // stride
    c = (stride - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(gh) * stride + c, np.arange(gw) * stride + c, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1), (gh, gw)


def render(view: View, stride: int, leaf: Leaf) -> np.ndarray:
    """The view sampled at the cell centres of its stride-`stride` grid: (h // stride, w // stride) float64."""
    xy, grid = _cell_centres(view.shape, stride)
    values, _ = evaluate(view, xy, leaf)
    return values.reshape(grid)


def render_grids(view: View, strides: Sequence[int], leaf: GridLeaf,
                 fill: Sequence[float] | None = None) -> list[np.ndarray]:
    """render() at several strides in one walk of the view tree: the cell centres of every grid go down together and
    leaf(source, xy, grid) receives each point's grid index (0..len(strides)-1). With `fill`, points no image covers
    take what the leaf of the first source around them gives beyond its image (NaN: nothing), then fill[grid];
    without, they are 0."""
    grids = [_cell_centres(view.shape, s) for s in strides]
    bounds = np.cumsum([0] + [len(xy) for xy, _ in grids])
    xy = np.concatenate([xy for xy, _ in grids])
    def grid_leaf(source, pts, ids):
        return leaf(source, pts, np.searchsorted(bounds, ids, side="right") - 1)

    ids = np.arange(len(xy))
    values, covered = _evaluate(view, xy, ids, grid_leaf)
    if fill is not None and not covered.all():
        rest = ~covered
        more, got = _evaluate(view, xy[rest], ids[rest], grid_leaf, extend=True)
        values[np.flatnonzero(rest)[got]] = more[got]
        covered[np.flatnonzero(rest)[got]] = True
    out = [values[a:b].reshape(shape) for a, b, (_, shape) in zip(bounds[:-1], bounds[1:], grids)]
    if fill is not None:
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            out[k][~covered[a:b].reshape(out[k].shape)] = fill[k]
    return out


def bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples of a 2-D array at fractional (column u, row v); edges are extended."""
    h, w = grid.shape
    u = np.clip(u, 0.0, w - 1.0)
    v = np.clip(v, 0.0, h - 1.0)
    u0 = np.minimum(np.floor(u).astype(np.int64), max(w - 2, 0))
    v0 = np.minimum(np.floor(v).astype(np.int64), max(h - 2, 0))
    u1, v1 = np.minimum(u0 + 1, w - 1), np.minimum(v0 + 1, h - 1)
    fu, fv = u - u0, v - v0
    top = grid[v0, u0] * (1.0 - fu) + grid[v0, u1] * fu
    bottom = grid[v1, u0] * (1.0 - fu) + grid[v1, u1] * fu
    return top * (1.0 - fv) + bottom * fv
