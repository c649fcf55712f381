"""ultralytics' augmentation internals that atcache reads, each behind one named function.

atcache's tracked transforms (atcache.train.transforms) subclass ultralytics' Mosaic, RandomPerspective, MixUp,
RandomFlip and LetterBox through `apply_image(labels, params)`, the hook ultralytics' BaseTransform documents for
subclasses. What that hook is handed is not documented: the `params` dict each transform's `get_params` computes (its
keys), the mix partners in `labels`, and some transform fields. Every such read (or write) is here, with the releases
it is known to hold for; tests/yolo/test_contracts.py asserts each against the installed ultralytics (CI: also the
oldest of the supported range). None of them needed a per-release branch from 8.4.150 through 8.4.190.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def copy_transform(transform, cls: type | None = None):
    """A new object of `cls` (default: the transform's own class) holding the same state as `transform`, without
    calling its __init__: the transform's attributes (parameters, dataset, pre_transform, ...) are shared, not copied.

    Reads `transform.__dict__`: ultralytics' transforms keep all their state in instance attributes (no __slots__, no
    class-level state set per object), 8.4.150-8.4.190."""
    cls = type(transform) if cls is None else cls
    new = cls.__new__(cls)
    new.__dict__.update(transform.__dict__)
    return new


def pre_transform(transform):
    """The transform a mix transform (Mosaic, MixUp, CutMix, CopyPaste) applies to its partners before mixing, or None
    (also for a transform without one).

    Reads `transform.pre_transform` (BaseMixTransform.__init__ sets it: Mosaic, MixUp, CutMix, CopyPaste),
    8.4.150-8.4.190."""
    return getattr(transform, "pre_transform", None)


def set_pre_transform(transform, value) -> None:
    """Make a mix transform apply `value` to its partners before mixing.

    Writes `transform.pre_transform`, which BaseMixTransform.get_params applies to every partner, 8.4.150-8.4.190."""
    transform.pre_transform = value


def disable_mosaic_buffer(mosaic) -> None:
    """Mosaic partners drawn from the whole dataset, not from the worker's buffer of recently loaded images.

    Writes `Mosaic.buffer_enabled` (read by Mosaic.get_indexes: False -> random.randint over the dataset), set in
    __init__ to `dataset.cache != "ram"`, 8.4.150-8.4.190."""
    mosaic.buffer_enabled = False


def mosaic_tiles(mosaic, params: dict[str, Any]) -> list[tuple[dict, int, int]]:
    """Per tile of a mosaic just made: (the tile's labels as its pre-transform left them, dx, dy), where (dx, dy) is
    the translation from the tile's pixels to the final mosaic's (the 2s canvas; 9 tiles: after the centre crop).

    Reads `params["layout"]` (Mosaic.get_params: one dict per tile with "labels_patch", "padw", "padh"), `Mosaic.n`
    (4 or 9) and `Mosaic.border` (the 9-tile crop offset), 8.4.150-8.4.190."""
    layout = params["layout"]
    if mosaic.n == 4:
        return [(item["labels_patch"], item["padw"], item["padh"]) for item in layout]
    bx, by = mosaic.border  # 9 tiles on a 3s canvas, then the centre 2s crop
    return [(item["labels_patch"], item["padw"] + bx, item["padh"] + by) for item in layout]


def affine_matrix(params: dict[str, Any]) -> np.ndarray:
    """The 3x3 matrix RandomPerspective warped the image with (source pixel -> output pixel, cv2's convention).

    Reads `params["M"]` (RandomPerspective.get_params), 8.4.150-8.4.190."""
    return np.asarray(params["M"], dtype=np.float64)


def mix_partner(labels: dict[str, Any]) -> dict[str, Any]:
    """The labels of the image MixUp blends into `labels` (as its pre-transform left them); only inside apply_image.

    Reads `labels["mix_labels"][0]` (BaseMixTransform.get_params puts the partners there; its __call__ pops them after
    the apply_* steps), 8.4.150-8.4.190."""
    return labels["mix_labels"][0]


def mixup_ratio(params: dict[str, Any]) -> float:
    """MixUp's weight r of the primary image (the partner gets 1 - r).

    Reads `params["r"]` (MixUp.get_params: np.random.beta(32, 32)), 8.4.150-8.4.190."""
    return float(params["r"])


def flip_direction(params: dict[str, Any]) -> str | None:
    """"horizontal" or "vertical" if RandomFlip flipped the image, else None.

    Reads `params["flip"]` and `params["direction"]` (RandomFlip.get_params), 8.4.150-8.4.190."""
    return params["direction"] if params["flip"] else None


def letterbox_placement(params: dict[str, Any]) -> tuple[tuple[int, int], int, int]:
    """((w, h) the image was resized to, left pad, top pad) of a LetterBox just applied.

    Reads `params["new_unpad"]` (w, h), `params["left"]` and `params["top"]` (LetterBox.get_params), 8.4.150-8.4.190
    (8.4.190 keeps each resized side >= 1 pixel; the keys are the same)."""
    w, h = params["new_unpad"]
    return (int(w), int(h)), params["left"], params["top"]
