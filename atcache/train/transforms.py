"""ultralytics' augmentation pipelines as atcache's datasets use them.

`--targets warp`: ultralytics' own Mosaic / RandomPerspective / MixUp / RandomFlip / LetterBox, built by ultralytics
(defaults, close_mosaic and all), are copied into Tracked* subclasses with the same state and randomness and one extra
step: they record, next to the image, the view tree of `views.py` (which source rows, which matrices, which blend
ratio). The images stay exactly what plain ultralytics produces. What ultralytics hands `apply_image` (its params,
the mix partners) is read through atcache.yolo.transforms.
`--targets static`: only letterbox + photometric augmentation, so the cached maps are exact targets.
ultralytics names come through atcache.yolo.
"""

from __future__ import annotations

from atcache.yolo import (
    Albumentations, Compose, CopyPaste, CutMix, Format, LetterBox, MixUp, Mosaic, RandomFlip, RandomHSV,
    RandomPerspective,
)
from atcache.yolo.transforms import (
    affine_matrix, copy_transform, disable_mosaic_buffer, flip_direction, letterbox_placement, mix_partner,
    mixup_ratio, mosaic_tiles, pre_transform, set_pre_transform,
)

from atcache.errors import AtcacheError
from atcache.train.targets import VIEW_KEY
from atcache.train.views import Blend, Canvas, Placed, flip_matrix, resize_matrix, translation, warp


class Tracked:
    """Mixin of the tracked transforms: made from the transform ultralytics built, never by class assignment."""

    @classmethod
    def of(cls, transform):
        """A new tracked transform with the state of `transform` (its parameters, dataset, pre_transform)."""
        return copy_transform(transform, cls)


class TrackedMosaic(Tracked, Mosaic):
    def apply_image(self, labels, params=None):
        labels = super().apply_image(labels, params)
        tiles = tuple(Placed(patch[VIEW_KEY], translation(dx, dy)) for patch, dx, dy in mosaic_tiles(self, params))
        labels[VIEW_KEY] = Canvas(tuple(labels["img"].shape[:2]), tiles, "mosaic")
        return labels


class TrackedRandomPerspective(Tracked, RandomPerspective):
    def apply_image(self, labels, params=None):
        view = labels[VIEW_KEY]
        labels = super().apply_image(labels, params)
        labels[VIEW_KEY] = warp(view, affine_matrix(params), labels["img"].shape[:2], "affine")
        return labels


class TrackedMixUp(Tracked, MixUp):
    def apply_image(self, labels, params=None):
        view, other = labels[VIEW_KEY], mix_partner(labels)[VIEW_KEY]
        labels = super().apply_image(labels, params)
        ratio = mixup_ratio(params)
        labels[VIEW_KEY] = Blend(tuple(labels["img"].shape[:2]), ((view, ratio), (other, 1.0 - ratio)))
        return labels


class TrackedRandomFlip(Tracked, RandomFlip):
    def apply_image(self, labels, params):
        view = labels[VIEW_KEY]
        labels = super().apply_image(labels, params)
        direction = flip_direction(params)
        if direction is not None:
            shape = tuple(labels["img"].shape[:2])
            labels[VIEW_KEY] = warp(view, flip_matrix(shape, direction), shape, "flip")
        return labels


class TrackedLetterBox(Tracked, LetterBox):
    def apply_image(self, labels, params):
        view, src = labels[VIEW_KEY], tuple(labels["img"].shape[:2])
        labels = super().apply_image(labels, params)
        (w, h), dx, dy = letterbox_placement(params)
        m = translation(dx, dy) @ resize_matrix(src, (h, w))
        labels[VIEW_KEY] = warp(view, m, labels["img"].shape[:2], "letterbox")
        return labels


TRACKED = {Mosaic: TrackedMosaic, RandomPerspective: TrackedRandomPerspective, MixUp: TrackedMixUp,
           RandomFlip: TrackedRandomFlip, LetterBox: TrackedLetterBox}
PHOTOMETRIC = (RandomHSV, Format)


def _check_trackable(t) -> None:
    """Refuse, in one line, a transform whose geometry atcache cannot follow."""
    if isinstance(t, (CutMix, CopyPaste)):
        if t.p > 0:
            name = "cutmix" if isinstance(t, CutMix) else "copy_paste"
            raise AtcacheError(
                f"{name}={t.p} cannot be aligned with cached attention maps; train with {name}=0 (or --targets static)"
            )
    elif isinstance(t, Albumentations):
        if t.transform is not None and getattr(t, "contains_spatial", False):
            raise AtcacheError(
                "custom Albumentations with spatial transforms cannot be aligned with cached attention maps; "
                "use pixel-level augmentations only"
            )
    elif not isinstance(t, PHOTOMETRIC + tuple(TRACKED.values())):
        raise AtcacheError(
            f"the training pipeline contains {type(t).__name__}, which atcache cannot align cached maps with; "
            "use ultralytics' default detection augmentations or --targets static"
        )


def tracked_pipeline(transforms):
    """A copy of an ultralytics pipeline whose geometric transforms record the view; refuses what cannot be tracked.

    Every transform reached (Compose children, pre_transforms) is copied once, a shared one (the pre_transform Compose
    of MixUp and CutMix, the affine of CopyPaste) into one shared copy: the copy draws the same randomness in the same
    order as the original would."""
    copies: dict[int, object] = {}

    def copy_of(t):
        if t is None:
            return None
        if id(t) in copies:
            return copies[id(t)]
        kind = TRACKED.get(type(t))
        if kind is not None:
            new = kind.of(t)
        else:
            if not isinstance(t, Compose):
                _check_trackable(t)
            new = copy_transform(t)
        copies[id(t)] = new
        if isinstance(t, Compose):
            new.transforms = [copy_of(child) for child in t.transforms]
        elif pre_transform(t) is not None:
            set_pre_transform(new, copy_of(pre_transform(t)))
        return new

    return copy_of(transforms)


def static_pipeline(transforms, imgsz: int, hyp):
    """`transforms` (ultralytics' Compose, Format last) with everything before Format replaced by letterbox (as the
    cache) + photometric augmentation only: the cached maps are the exact targets."""
    transforms.transforms[:-1] = [LetterBox(new_shape=(imgsz, imgsz), scaleup=False, center=True),
                                  RandomHSV(hgain=hyp.hsv_h, sgain=hyp.hsv_s, vgain=hyp.hsv_v)]
    return transforms


def unbuffered(transforms) -> None:
    """Mosaic partners from the whole dataset (seeded), not from the worker's buffer of recently loaded images."""
    for t in transforms.transforms if isinstance(transforms, Compose) else [transforms]:
        if isinstance(t, Mosaic):
            disable_mosaic_buffer(t)
        if isinstance(t, Compose):
            unbuffered(t)
