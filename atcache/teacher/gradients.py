"""build-cache --gradient: the teacher's input gradient J_T = dL/dx of every static row (atcache.attention.gradient
has the math), beside the maps. x is the row's letterboxed image exactly as the maps' teacher sees it (RGB in [0, 1]);
L is ultralytics' detection loss of that image alone on its YOLO labels, letterboxed the same way. The maps' teacher
is fused (Conv+BN folded, and an end-to-end head's training branch removed, which its loss needs), so the gradients
come from a second, unfused copy of the same weights, in eval mode and with autograd on."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atcache.attention.gradient import criterion, input_gradient, pool_gradient, split as split_gradient
from atcache.cache.format import LETTERBOX_COLUMNS, CacheSpec
from atcache.data.splits import SplitFiles
from atcache.errors import AtcacheError

GAIN_KEYS = ("box", "cls", "dfl")


def loss_gains(given: Sequence[float] = ()) -> dict[str, float]:
    """{"box", "cls", "dfl"}: the gains given (--gradient-gains), else ultralytics' defaults."""
    if given:
        return dict(zip(GAIN_KEYS, map(float, given)))
    from atcache.yolo import DEFAULT_CFG_DICT

    return {k: float(DEFAULT_CFG_DICT[k]) for k in GAIN_KEYS}


def gradient_teacher(teacher: str, nc: int, spec: CacheSpec, device: torch.device) -> torch.nn.Module:
    """The teacher for gradients: unfused, eval mode, on `device`, its criterion's gains those of `spec`; refused if its
    weights are not the ones the cache was made with."""
    from atcache.yolo import load_model

    loaded = load_model(teacher, nc=nc, device=device, fuse=False)
    if loaded.weights_sha256 != spec.teacher_weights_sha256:
        raise AtcacheError(f"teacher {teacher} holds other weights than the cache was built with ({spec.teacher_name}); "
                           "pass the teacher the cache was built with")
    model = loaded.model
    crit = criterion(model)
    crit.hyp = type(crit.hyp)(**{**vars(crit.hyp), **spec.gradient_gains})
    return model


def read_labels(image: str | Path) -> np.ndarray:
    """(k, 5) float32 [cls, x, y, w, h] (normalised to the original image) of an image's YOLO label file, read as
    ultralytics' verify_image_label reads it: polygons (more than 6 columns) become their boxes, duplicate rows are
    dropped; no label file: no boxes."""
    from atcache.yolo import img2label_paths

    path = Path(img2label_paths([str(image)])[0])
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = [line.split() for line in path.read_text().strip().splitlines() if len(line)]
    if any(len(r) > 6 for r in rows):
        boxes = []
        for r in rows:
            xy = np.array(r[1:], dtype=np.float32).reshape(-1, 2)
            (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
            boxes.append([float(r[0]), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        labels = np.array(boxes, dtype=np.float32)
    else:
        labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    if len(labels):
        _, keep = np.unique(labels, axis=0, return_index=True)
        if len(keep) < len(labels):
            labels = labels[keep]
    return labels


def letterbox_labels(labels: np.ndarray, letterbox: np.ndarray, imgsz: int) -> np.ndarray:
    """(k, 5) [cls, x, y, w, h] normalised to the original image -> normalised to the imgsz x imgsz letterboxed image,
    with the row's letterbox (LETTERBOX_COLUMNS): the resized image (h, w) placed at (pad_top, pad_left), as
    ultralytics' LetterBox moves the boxes."""
    lb = dict(zip(LETTERBOX_COLUMNS, np.asarray(letterbox, dtype=np.float64).tolist()))
    out = np.asarray(labels, dtype=np.float64).copy()
    out[:, 1] = (out[:, 1] * lb["w"] + lb["pad_left"]) / imgsz
    out[:, 2] = (out[:, 2] * lb["h"] + lb["pad_top"]) / imgsz
    out[:, 3] *= lb["w"] / imgsz
    out[:, 4] *= lb["h"] / imgsz
    return out.astype(np.float32)


def batch_labels(split: SplitFiles, rows: Sequence[int], letterbox: np.ndarray, ok: np.ndarray, imgsz: int) -> dict:
    """ultralytics' label batch (batch_idx, cls (n, 1), bboxes (n, 4) normalised xywh of the letterboxed images) of
    `rows`; rows whose image was not read (not `ok`) get no boxes."""
    idx, boxes = [], []
    for i, (r, good) in enumerate(zip(rows, ok)):
        if good:
            lab = letterbox_labels(read_labels(split.absolute(r)), letterbox[i], imgsz)
            idx.append(np.full(len(lab), i, np.float32))
            boxes.append(lab)
    lab = np.concatenate(boxes) if boxes else np.zeros((0, 5), np.float32)
    idx = np.concatenate(idx) if idx else np.zeros(0, np.float32)
    return {"batch_idx": torch.from_numpy(idx), "cls": torch.from_numpy(lab[:, :1].copy()),
            "bboxes": torch.from_numpy(lab[:, 1:].copy())}


def teacher_gradients(model: torch.nn.Module, images: torch.Tensor, labels: dict, stride: int,
                      ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(direction (n, 3, H/s, W/s) float16, norm (n,) float32) of J_T pooled by `stride` for images (n, 3, H, W) uint8
    RGB; rows not `ok` are NaN."""
    device = next(model.parameters()).device
    x = images.to(device).float().div_(255.0)
    labels = {k: v.to(device) for k, v in labels.items()}
    direction, norm = split_gradient(pool_gradient(input_gradient(model, x, labels), stride))
    direction, norm = direction.cpu().numpy().astype(np.float16), norm.cpu().numpy()
    direction[~ok] = np.nan
    norm[~ok] = np.nan
    return direction, norm
