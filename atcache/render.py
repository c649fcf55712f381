"""Warp targets of a whole batch rendered in torch on the training device, from the cache held as tensors.

Loader workers only flatten each sample's view tree (`geometry.py`) into pieces: per source reached, its cache row,
the 3x3 matrix from output pixels to that source's pixels, the clip regions on the way, its blend group and weight
(`flatten`). After collation the trainer renders every layer of the batch at once (`BatchRenderer.render`) with the
rules of the numpy reference (`TargetRendering.warped`): the last covering piece of a blend group wins, uncovered
cells borrow from the first piece whose cached grid reaches them, then the layer's grey energy; blend groups are
mixed by weight and each map renormalised. The two agree within 1e-4 per cell (tests/test_render.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from atcache.errors import AtcacheError
from atcache.geometry import Blend, Canvas, Source, View

PIECES_KEY = "at_pieces"
NO_CLIP = 1e9  # the (h, w) of a padding clip: every point is inside


@dataclass(frozen=True)
class Pieces:
    """One sample's view flattened (K pieces, C clips each): numpy arrays, cheap to pickle from a loader worker."""

    shape: tuple[int, int]  # (h, w) of the augmented image
    rows: np.ndarray  # (K,) int64 cache rows
    to_source: np.ndarray  # (K, 3, 3) float64: output pixel -> the source's resized-image pixel
    source_shape: np.ndarray  # (K, 2) float64 (h, w) of the resized source image
    pad: np.ndarray  # (K, 2) float64 (top, left) of the source's letterbox in the cache
    clips: np.ndarray  # (K, C, 3, 3) float64: output pixel -> the frame of each canvas on the way down
    clip_shape: np.ndarray  # (K, C, 2) float64 (h, w) of those canvases (NO_CLIP: padding)
    group: np.ndarray  # (K,) int64 blend group (one per MixUp part; 0 without MixUp)
    weight: np.ndarray  # (K,) float64 the group's blend weight


def _has_blend(view: View) -> bool:
    if isinstance(view, Blend):
        return True
    return isinstance(view, Canvas) and any(_has_blend(p.view) for p in view.children)


def flatten(view: View, pad_of) -> Pieces:
    """The view tree as pieces in paint (depth-first) order; `pad_of(row)` gives a row's (top, left) letterbox pad.

    A MixUp (Blend) under a canvas with several children has no flat form; ultralytics' pipelines never make one."""
    pieces: list[tuple] = []
    n_groups = [1]

    def walk(v: View, m: np.ndarray, clips: tuple, group: int, weight: float) -> None:
        if isinstance(v, Source):
            pieces.append((v.row, m, v.shape, clips, group, weight))
        elif isinstance(v, Canvas):
            if len(v.children) > 1 and any(_has_blend(p.view) for p in v.children):
                raise AtcacheError("a MixUp under a canvas of several views cannot be rendered on the device; "
                                   "use ultralytics' transform order (MixUp after Mosaic)")
            for placed in v.children:
                mc = np.linalg.inv(placed.matrix) @ m
                walk(placed.view, mc, clips if isinstance(placed.view, Source) else clips + ((mc, placed.view.shape),),
                     group, weight)
        elif isinstance(v, Blend):
            for part, w in v.parts:
                n_groups[0] += 1
                walk(part, m, clips, n_groups[0] - 1, weight * w)
        else:
            raise TypeError(f"not a view: {type(v).__name__}")

    walk(view, np.eye(3), (), 0, 1.0)
    k, c = len(pieces), max([len(p[3]) for p in pieces] + [1])
    clips = np.tile(np.eye(3), (k, c, 1, 1))
    clip_shape = np.full((k, c, 2), NO_CLIP)
    for i, p in enumerate(pieces):
        for j, (m, shape) in enumerate(p[3]):
            clips[i, j], clip_shape[i, j] = m, shape
    return Pieces(
        shape=tuple(view.shape), rows=np.array([p[0] for p in pieces], dtype=np.int64),
        to_source=np.array([p[1] for p in pieces]).reshape(k, 3, 3),
        source_shape=np.array([p[2] for p in pieces], dtype=np.float64).reshape(k, 2),
        pad=np.array([pad_of(p[0]) for p in pieces], dtype=np.float64).reshape(k, 2),
        clips=clips, clip_shape=clip_shape, group=np.array([p[4] for p in pieces], dtype=np.int64),
        weight=np.array([p[5] for p in pieces], dtype=np.float64))


def collate_pieces(samples: Sequence[Pieces]) -> dict[str, torch.Tensor]:
    """A batch of pieces padded to the most pieces (row -1) and clips (NO_CLIP) of any sample."""
    b = len(samples)
    k = max(len(p.rows) for p in samples)
    c = max(p.clips.shape[1] for p in samples)
    out = {"shape": torch.tensor([p.shape for p in samples], dtype=torch.int64),
           "rows": torch.full((b, k), -1, dtype=torch.int64),
           "to_source": torch.eye(3, dtype=torch.float64).repeat(b, k, 1, 1),
           "source_shape": torch.zeros((b, k, 2), dtype=torch.float64),
           "pad": torch.zeros((b, k, 2), dtype=torch.float64),
           "clips": torch.eye(3, dtype=torch.float64).repeat(b, k, c, 1, 1),
           "clip_shape": torch.full((b, k, c, 2), NO_CLIP, dtype=torch.float64),
           "group": torch.zeros((b, k), dtype=torch.int64),
           "weight": torch.zeros((b, k), dtype=torch.float64)}
    for i, p in enumerate(samples):
        n, m = len(p.rows), p.clips.shape[1]
        for name in ("rows", "to_source", "source_shape", "pad", "group", "weight"):
            out[name][i, :n] = torch.from_numpy(getattr(p, name))
        out["clips"][i, :n, :m] = torch.from_numpy(p.clips)
        out["clip_shape"][i, :n, :m] = torch.from_numpy(p.clip_shape)
    return out


def _project(matrix: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of homogeneous points pts (P, 3) through matrices (..., 3, 3): each (..., P)."""
    q = torch.einsum("...ij,pj->...pi", matrix, pts)
    return q[..., 0] / q[..., 2], q[..., 1] / q[..., 2]


def _inside(x: torch.Tensor, y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """geometry.inside for points (..., P) and shapes (..., 2)."""
    h, w = shape[..., 0:1], shape[..., 1:2]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def _bilinear(energy: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """geometry.bilinear of maps energy (M, H, W) at (u, v) (M, P): edges extended; (M, P) float64."""
    m, h, w = energy.shape
    u, v = u.clamp(0.0, w - 1.0), v.clamp(0.0, h - 1.0)
    u0 = torch.clamp(torch.floor(u).long(), max=max(w - 2, 0))
    v0 = torch.clamp(torch.floor(v).long(), max=max(h - 2, 0))
    u1, v1 = torch.clamp(u0 + 1, max=w - 1), torch.clamp(v0 + 1, max=h - 1)
    fu, fv = u - u0, v - v0
    flat = energy.reshape(m, h * w).double()

    def at(vi, ui):
        return torch.gather(flat, 1, vi * w + ui)

    top = at(v0, u0) * (1.0 - fu) + at(v0, u1) * fu
    bottom = at(v1, u0) * (1.0 - fu) + at(v1, u1) * fu
    return top * (1.0 - fv) + bottom * fv


class BatchRenderer:
    """Cached maps of some layers as tensors on one device (float16, or uint8 with per-map scales), rendering the warp
    targets of whole batches. On a CPU the tensors share the arrays' memory."""

    def __init__(self, maps: dict[int, np.ndarray], norms: dict[int, np.ndarray], scales: dict[int, np.ndarray] | None,
                 strides: dict[int, int], grey: dict[int, float], eps: float, device="cpu"):
        self.device = torch.device(device)
        self.layers = tuple(maps)
        self.maps = {i: torch.from_numpy(maps[i]).to(self.device) for i in self.layers}
        self.norms = {i: torch.from_numpy(np.asarray(norms[i], np.float32)).to(self.device) for i in self.layers}
        self.scales = None if scales is None else {
            i: torch.from_numpy(np.asarray(scales[i], np.float32)).to(self.device) for i in self.layers}
        self.strides, self.grey, self.eps = dict(strides), dict(grey), eps

    def nbytes(self) -> int:
        """Bytes of the cache held by this renderer (on its device)."""
        held = list(self.maps.values()) + list(self.norms.values()) + list((self.scales or {}).values())
        return sum(t.numel() * t.element_size() for t in held)

    def energy(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The un-normalised maps a = A * ||a|| of `rows` (M,), (M, H, W) float32."""
        stored = self.maps[layer][rows]
        if self.scales is None:
            maps = stored.float()
        else:
            q = stored.float() / 255.0  # decoded as store.decode_maps decodes (to float16)
            maps = (self.scales[layer][rows][:, None, None] * q * q).half().float()
        return maps * self.norms[layer][rows][:, None, None]

    def render(self, pieces: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer: (B, h // s, w // s) float32 targets of a batch of collated pieces (see `collate_pieces`)."""
        p = {k: v.to(self.device, non_blocking=True) for k, v in pieces.items()}
        h, w = (int(x) for x in pieces["shape"][0])
        valid = p["rows"] >= 0
        rows = p["rows"].clamp(min=0)
        b, k = rows.shape
        out = []
        for layer in self.layers:
            s = self.strides[layer]
            c = (s - 1) / 2.0
            gh, gw = h // s, w // s
            ys, xs = torch.meshgrid(torch.arange(gh, device=self.device, dtype=torch.float64) * s + c,
                                    torch.arange(gw, device=self.device, dtype=torch.float64) * s + c, indexing="ij")
            pts = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(gh * gw, device=self.device,
                                                                           dtype=torch.float64)], dim=1)
            x, y = _project(p["to_source"], pts)  # (B, K, P)
            cx, cy = _project(p["clips"], pts)  # (B, K, C, P)
            clipped = _inside(cx, cy, p["clip_shape"]).all(dim=2) & valid[..., None]
            covers = clipped & _inside(x, y, p["source_shape"])
            u = (x + p["pad"][..., 1:2] - c) / s
            v = (y + p["pad"][..., 0:1] - c) / s
            energy = self.energy(layer, rows.reshape(-1))
            eh, ew = energy.shape[1:]
            reaches = clipped & (u >= -0.5) & (u <= ew - 0.5) & (v >= -0.5) & (v <= eh - 0.5)
            values = _bilinear(energy, u.reshape(b * k, -1), v.reshape(b * k, -1)).reshape(b, k, -1)
            order = torch.arange(1, k + 1, device=self.device)[None, :, None]
            painted, _ = self._mix(values, covers, order, p)  # the last covering piece of each group
            borrowed, got = self._mix(values, reaches, k + 1 - order, p)  # the first piece that reaches the cell
            covered = covers.any(dim=1)
            grey = torch.tensor(self.grey.get(layer, 0.0), device=self.device, dtype=torch.float64)
            e = torch.where(covered, painted, torch.where(got, borrowed, grey)).reshape(b, gh, gw)
            e = e / (torch.linalg.vector_norm(e, dim=(1, 2), keepdim=True) + self.eps)
            out.append(e.float())
        return out

    @staticmethod
    def _mix(values: torch.Tensor, ok: torch.Tensor, rank: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over blend groups of weight x the value of the highest-`rank` piece that is `ok` in that group:
        ((B, P) float64, (B, P) whether any group had one)."""
        total = torch.zeros(values.shape[0], values.shape[2], dtype=torch.float64, device=values.device)
        any_ok = torch.zeros_like(total, dtype=torch.bool)
        for g in torch.unique(p["group"]).tolist():
            sel = ok & (p["group"] == g)[..., None]
            best = torch.where(sel, rank, 0).argmax(dim=1, keepdim=True)  # (B, 1, P)
            has = sel.any(dim=1)
            value = torch.gather(values, 1, best)[:, 0] * torch.gather(p["weight"][..., None].expand_as(values), 1, best)[:, 0]
            total += torch.where(has, value, 0.0)
            any_ok |= has
        return total, any_ok
