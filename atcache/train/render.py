"""The warp renderer, the only one: warp targets of a whole batch rendered in torch on the training device, from the
cache held as tensors or from the rows each batch ships. Training, the streamed cache and `atcache fidelity` all render
with it.

Loader workers only flatten each sample's view tree (`views.py`) into pieces: per source reached, its cache row,
the 3x3 matrix from output pixels to that source's pixels, the clip regions on the way, its blend group and weight
(`flatten`); a cache streamed from disk also ships those rows' maps as stored (`Pieces.maps`), since the device
cannot hold them all. After collation the trainer renders every layer of the batch at once (`BatchRenderer.render`,
from the maps it holds or the ones the batch brings). The rules: a cell's centre is carried through the piece's
matrix into its source's resized image and sampled bilinearly (edges extended) from the cached energy a = A * ||a||
at that layer's stride, through the source's letterbox pad; the last covering piece of a blend group wins, uncovered
cells borrow from the first piece whose cached grid reaches them, then the layer's grey energy; blend groups are
mixed by weight and each map renormalised (tests/train/test_render.py checks each rule). `render_views` renders
single views the same way (`TargetRendering.warped`: a dataset built without `pieces`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from atcache.errors import AtcacheError
from atcache.train.views import Blend, Canvas, Source, View

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
    # shipped by a cache streamed from disk (else None: the renderer holds every row): per layer, of each piece's row
    maps: dict[int, np.ndarray] | None = None  # (K, H, W) as stored: float16, or uint8 with `scales`
    norms: dict[int, np.ndarray] | None = None  # (K,) float32
    scales: dict[int, np.ndarray] | None = None  # (K,) float32, uint8 maps only


def _has_blend(view: View) -> bool:
    if isinstance(view, Blend):
        return True
    return isinstance(view, Canvas) and any(_has_blend(p.view) for p in view.children)


def _always_inside(matrix: np.ndarray, out_shape: tuple[int, int], shape: tuple[int, int]) -> bool:
    """Whether every pixel centre of an output image of `out_shape` maps (through `matrix`) strictly inside a canvas of
    `shape`: then clipping by that canvas changes nothing and is left out (a flip, or an affine output that lies within
    its mosaic canvas). The corners suffice: the map is projective and positive over the rectangle (convex stays convex)."""
    h, w = out_shape
    corners = np.array([[0.0, 0.0, 1.0], [w - 1.0, 0.0, 1.0], [0.0, h - 1.0, 1.0], [w - 1.0, h - 1.0, 1.0]]) @ matrix.T
    if (corners[:, 2] <= 0).any():
        return False
    x, y = corners[:, 0] / corners[:, 2], corners[:, 1] / corners[:, 2]
    margin = 1e-6  # points on the edge are decided per point
    return bool(((x >= -0.5 + margin) & (x < shape[1] - 0.5 - margin) & (y >= -0.5 + margin)
                 & (y < shape[0] - 0.5 - margin)).all())


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
                keep = not isinstance(placed.view, Source) and not _always_inside(mc, view.shape, placed.view.shape)
                walk(placed.view, mc, clips + ((mc, placed.view.shape),) if keep else clips, group, weight)
        elif isinstance(v, Blend):
            for part, w in v.parts:
                n_groups[0] += 1
                walk(part, m, clips, n_groups[0] - 1, weight * w)
        else:
            raise TypeError(f"not a view: {type(v).__name__}")

    walk(view, np.eye(3), (), 0, 1.0)
    k, c = len(pieces), max([len(p[3]) for p in pieces] + [0])
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
    """A batch of pieces padded to the most pieces (row -1) and clips (NO_CLIP) of any sample. Shipped maps become the
    batch's table: `maps/<layer>` (M, H, W), `norms/<layer>` and `scales/<layer>` (M,), M the batch's pieces, and
    `rows` index it instead of the cache."""
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
    if samples[0].maps is not None:
        start = 0
        for i, p in enumerate(samples):
            out["rows"][i, :len(p.rows)] = torch.arange(start, start + len(p.rows))
            start += len(p.rows)
        for name in ("maps", "norms", "scales"):
            for layer in getattr(samples[0], name) or {}:
                out[f"{name}/{layer}"] = torch.from_numpy(np.concatenate([getattr(p, name)[layer] for p in samples]))
    return out


def render_views(source, views: Sequence[View], device="cpu") -> list[list[np.ndarray]]:
    """Per view, per layer the (h // s, w // s) float32 warp target, rendered as training renders it: the views
    flattened by `source.pieces` (a target source that renders batches), collated, and rendered together by
    `source.batch_renderer(device)`. The views must share one output shape, as a training batch does."""
    rendered = source.batch_renderer(device).render(collate_pieces([source.pieces(v) for v in views]))
    return [[layer[k].cpu().numpy() for layer in rendered] for k in range(len(views))]


def _project(matrix: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of homogeneous points pts (P, 3) through matrices (..., 3, 3): each (..., P) (elementwise: a matmul
    with an inner size of 3 is slower on a CPU)."""
    m = matrix[..., None]  # (..., 3, 3, 1) against points (P,)
    px, py = pts[:, 0], pts[:, 1]
    q = m[..., 0, :] * px + m[..., 1, :] * py + m[..., 2, :]  # (..., 3, P): rows of M times [x, y, 1]
    return q[..., 0, :] / q[..., 2, :], q[..., 1, :] / q[..., 2, :]


def _inside(x: torch.Tensor, y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Whether points (..., P) lie in images of shapes (..., 2): their nearest pixel does."""
    h, w = shape[..., 0:1], shape[..., 1:2]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


class BatchRenderer:
    """Renders the warp targets of whole batches on one device, from the cached maps of some layers held there as
    tensors (float16, or uint8 with per-map scales; on a CPU they share the arrays' memory), or with `maps` None from
    the rows each batch brings (`Pieces.maps`: a cache streamed from disk)."""

    def __init__(self, maps: dict[int, np.ndarray] | None, norms: dict[int, np.ndarray] | None,
                 scales: dict[int, np.ndarray] | None, strides: dict[int, int], grey: dict[int, float], eps: float,
                 device="cpu"):
        self.device = torch.device(device)
        self.layers = tuple(strides)
        self.maps = self.norms = self.scales = None
        if maps is not None:
            self.maps = {i: torch.from_numpy(maps[i]).to(self.device) for i in self.layers}
            self.norms = {i: torch.from_numpy(np.asarray(norms[i], np.float32)).to(self.device) for i in self.layers}
            self.scales = None if scales is None else {
                i: torch.from_numpy(np.asarray(scales[i], np.float32)).to(self.device) for i in self.layers}
        self.strides, self.grey, self.eps = dict(strides), dict(grey), eps

    def nbytes(self) -> int:
        """Bytes of the cache held by this renderer (on its device): none when batches bring their rows."""
        held = list((self.maps or {}).values()) + list((self.norms or {}).values()) + list((self.scales or {}).values())
        return sum(t.numel() * t.element_size() for t in held)

    def table(self, p: dict[str, torch.Tensor]) -> tuple[dict, dict, dict | None]:
        """(maps, norms, scales or None) per layer that the batch's `rows` index: held, or shipped with the batch."""
        if self.maps is not None:
            return self.maps, self.norms, self.scales
        if f"maps/{self.layers[0]}" not in p:
            raise AtcacheError("this renderer renders from the rows each batch ships, and the batch brought none")
        maps, norms = ({i: p[f"{name}/{i}"] for i in self.layers} for name in ("maps", "norms"))
        return maps, norms, {i: p[f"scales/{i}"] for i in self.layers} if f"scales/{self.layers[0]}" in p else None

    def render(self, pieces: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer: (B, h // s, w // s) float32 targets of a batch of collated pieces (see `collate_pieces`).
        Where each cell samples, and which piece wins it, depend on the stride alone: worked out once per stride."""
        p = {k: v.to(self.device, non_blocking=True) for k, v in pieces.items()}
        maps, norms, scales = self.table(p)
        h, w = (int(x) for x in pieces["shape"][0])
        valid = p["rows"] >= 0
        rows = p["rows"].clamp(min=0)
        b, k = rows.shape
        groups = torch.unique(p["group"]).tolist()
        out: dict[int, torch.Tensor] = {}
        for s in sorted({self.strides[i] for i in self.layers}):
            layers = [i for i in self.layers if self.strides[i] == s]
            c = (s - 1) / 2.0
            gh, gw = h // s, w // s
            ys, xs = torch.meshgrid(torch.arange(gh, device=self.device, dtype=torch.float64) * s + c,
                                    torch.arange(gw, device=self.device, dtype=torch.float64) * s + c, indexing="ij")
            pts = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(gh * gw, device=self.device,
                                                                           dtype=torch.float64)], dim=1)
            x, y = _project(p["to_source"], pts)  # (B, K, P)
            clipped = valid[..., None].expand(b, k, gh * gw)
            if p["clips"].shape[2]:
                cx, cy = _project(p["clips"], pts)  # (B, K, C, P)
                clipped = clipped & _inside(cx, cy, p["clip_shape"]).all(dim=2)
            covers = clipped & _inside(x, y, p["source_shape"])
            u = (x + p["pad"][..., 1:2] - c) / s
            v = (y + p["pad"][..., 0:1] - c) / s
            eh, ew = maps[layers[0]].shape[1:]
            reaches = clipped & (u >= -0.5) & (u <= ew - 0.5) & (v >= -0.5) & (v <= eh - 0.5)
            taps = _bilinear_taps(u.reshape(b * k, -1), v.reshape(b * k, -1), eh, ew)
            order = torch.arange(1, k + 1, device=self.device, dtype=torch.uint8 if k < 255 else torch.int64)[None, :, None]
            painted = _winners(covers, order, p["group"], groups)  # the last covering piece of each group
            borrowed = _winners(reaches, k + 1 - order, p["group"], groups)  # the first piece reaching the cell
            covered = covers.any(dim=1)
            got = torch.stack([has for _, has in borrowed]).any(dim=0)
            for layer in layers:
                energy = _energy(maps[layer], norms[layer], scales and scales[layer], rows.reshape(-1))
                values = _sample(energy, taps).reshape(b, k, -1)
                e = torch.where(covered, _mix(values, painted, p["weight"]),
                                torch.where(got, _mix(values, borrowed, p["weight"]),
                                            torch.tensor(self.grey.get(layer, 0.0), dtype=torch.float64,
                                                         device=self.device))).reshape(b, gh, gw)
                out[layer] = (e / (torch.linalg.vector_norm(e, dim=(1, 2), keepdim=True) + self.eps)).float()
        return [out[i] for i in self.layers]


def _energy(maps: torch.Tensor, norms: torch.Tensor, scales: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The un-normalised maps a = A * ||a|| of `rows` (M,) of a table (maps (N, H, W) as stored, norms and scales (N,)):
    (M, H, W) float32, uint8 maps decoded as store.decode_maps decodes them (to float16)."""
    stored = maps[rows]
    if scales is None:
        decoded = stored.float()
    else:
        q = stored.float() / 255.0
        decoded = (scales[rows][:, None, None] * q * q).half().float()
    return decoded * norms[rows][:, None, None]


def _bilinear_taps(u: torch.Tensor, v: torch.Tensor, h: int, w: int):
    """The four flat indices and weights of bilinear samples at (u, v) (M, P) on (H, W) maps: edges extended."""
    u, v = u.clamp(0.0, w - 1.0), v.clamp(0.0, h - 1.0)
    u0 = torch.clamp(u.long(), max=max(w - 2, 0))  # u, v >= 0 here: truncation is floor
    v0 = torch.clamp(v.long(), max=max(h - 2, 0))
    u1, v1 = torch.clamp(u0 + 1, max=w - 1), torch.clamp(v0 + 1, max=h - 1)
    fu, fv = u - u0, v - v0
    return ((v0 * w + u0, (1.0 - fu) * (1.0 - fv)), (v0 * w + u1, fu * (1.0 - fv)),
            (v1 * w + u0, (1.0 - fu) * fv), (v1 * w + u1, fu * fv))


def _sample(energy: torch.Tensor, taps) -> torch.Tensor:
    """Bilinear samples (M, P) float64 of maps energy (M, H, W) at the taps of `_bilinear_taps`."""
    flat = energy.reshape(len(energy), -1).double()
    return sum(torch.gather(flat, 1, index) * weight for index, weight in taps)


def _winners(ok: torch.Tensor, rank: torch.Tensor, group: torch.Tensor, groups: list[int]):
    """Per blend group: (index (B, 1, P) of the highest-`rank` piece that is `ok` in the group, whether there is one
    (B, P))."""
    out = []
    for g in groups:
        sel = ok & (group == g)[..., None]
        out.append((torch.where(sel, rank, 0).argmax(dim=1, keepdim=True).long(), sel.any(dim=1)))
    return out


def _mix(values: torch.Tensor, winners, weight: torch.Tensor) -> torch.Tensor:
    """Sum over blend groups of the group's weight x the value (B, K, P) of its winning piece: (B, P) float64."""
    total = torch.zeros(values.shape[0], values.shape[2], dtype=torch.float64, device=values.device)
    for best, has in winners:
        value = torch.gather(values, 1, best)[:, 0] * torch.gather(weight[..., None].expand_as(values), 1, best)[:, 0]
        total += torch.where(has, value, 0.0)
    return total
