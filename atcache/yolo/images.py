"""ultralytics' image pipeline, as the teacher sees it: a split's image files, their decoding and the un-augmented
training input (`load_image`, then a centred grey-114 `LetterBox`, then `Format`), every step by ultralytics' own code.

`TeacherInputs` is a `YOLODataset` with augment=False over exactly the given files, in their order: ultralytics'
`get_image_and_label` (its `load_image`), a `LetterBox(center=True, scaleup=False, padding_value=114)` and its
`Format`, batched by its `collate_fn`, as the replay build's augmented views come from a `YOLODataset` with
augment=True (atcache.train.datasets) through the same `collate_fn`. It never scans the labels (the scan drops
images and re-saves JPEGs in place); with `labels`, each image's labels are read when it is loaded, by ultralytics'
own `verify_image_label` (through the dataset's `verify_args` and `result_to_label` hooks), from images that scan
would leave untouched only.

What this relies on beyond ultralytics' documented API, checked on 8.4.150 and 8.4.190 (tests/data/test_data.py):
- `BaseDataset.get_img_files` lists a split (`list_images`); `get_img_files` and `get_labels` are overridden.
- `BaseDataset.get_image_and_label` returns `resized_shape` as `load_image` made it; `LetterBox` then overwrites it
  with the output shape, so it is kept under LOADED_SHAPE_KEY first.
- `LetterBox` writes its padding into `ratio_pad[1]` as (left, top) (what ultralytics' validator scales boxes back
  with): `letterbox_pad`.
- `YOLODataset.get_label_files`, `verify_args`, `result_to_label` and `verify_image_label`'s result layout
  (the scan's hooks): `TeacherInputs` with labels.
- `utils.data.check_image` re-saves a JPEG without its FFD9 end marker, or fails and ultralytics drops the image:
  `check_image_outcome` runs it on a copy, `restore_like_check_image` keeps the re-saved copy.
- `BaseDataset.cv2_flag` for 3 channels is cv2.IMREAD_COLOR (`IMREAD_FLAGS`, for `decode`).
- `BaseDataset.load_image`'s long-side resize, re-stated for an image already in memory (`resize_long_side`): kept
  for callers holding decoded arrays; the teacher's input never takes that path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from atcache.yolo import DEFAULT_CFG, LOGGER, Compose, Format, LetterBox, YOLODataset, imread, ultralytics_attr

PAD_VALUE = 114
IMREAD_FLAGS = cv2.IMREAD_COLOR  # BaseDataset.cv2_flag for channels=3: 8-bit BGR (8.4.150-8.4.190)
LOADED_SHAPE_KEY = "atcache_loaded_shape"  # (h, w) of load_image's output, before LetterBox
JPEG_HEAD, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
BaseDataset = ultralytics_attr("ultralytics.data.base", "BaseDataset")
check_image = ultralytics_attr("ultralytics.data.utils", "check_image")


class _ImageList(BaseDataset):
    """A dataset that only lists: ultralytics' own `get_img_files` over `img_path`, no labels, no transforms."""

    def __init__(self, img_path: str | Sequence[str]):
        super().__init__(img_path=img_path if isinstance(img_path, str) else list(img_path), augment=False,
                         cache=False, prefix="")

    def get_labels(self) -> list[dict]:
        return []

    def build_transforms(self, hyp=None):
        return None


@contextlib.contextmanager
def _untraced():
    """Within: python's `random` is restored afterwards (ultralytics' `check_file_speeds` samples files with it and
    `Format` draws one number per image) and ultralytics' info lines are not logged (its warnings are), so that
    listing or loading images leaves no trace in a run."""
    state = random.getstate()
    quiet = logging.Filter()
    quiet.filter = lambda record: record.levelno >= logging.WARNING
    LOGGER.addFilter(quiet)
    try:
        yield
    finally:
        LOGGER.removeFilter(quiet)
        random.setstate(state)


def list_images(img_path: str | Sequence[str]) -> list[str]:
    """The image files of a data YAML split entry (a folder, a list file, or a list of them; absolute, as
    check_det_dataset resolves them) exactly as ultralytics' `BaseDataset.get_img_files` lists them: sorted, OS
    separators, images only (its read-speed check included: a slow disk is warned about). FileNotFoundError where
    ultralytics finds none."""
    with _untraced():
        return list(_ImageList(img_path).im_files)


def decode(path: str | Path) -> np.ndarray | None:
    """The image as ultralytics' dataset decodes it before resizing (`patches.imread` with the 3-channel
    `cv2_flag`): BGR uint8 (H, W, 3), EXIF-upright, grey/CMYK/16-bit/alpha converted; None if it cannot."""
    return imread(str(path), flags=IMREAD_FLAGS)


def rewritten_by_scan(path: str | Path) -> bool:
    """Whether ultralytics' label scan (`check_image`) would rewrite or drop this file for its end marker: a file with
    a JPEG header that does not end with FFD9. Reads five bytes; `check_image_outcome` says which."""
    with open(path, "rb") as f:
        head = f.read(3)
        f.seek(0, os.SEEK_END)
        if f.tell() < 4 or head != JPEG_HEAD:  # what PIL's JPEG plugin accepts
            return False
        f.seek(-2, os.SEEK_END)
        return f.read() != JPEG_END


def check_image_outcome(path: str | Path) -> str:
    """What ultralytics' label scan does to this file, found by running its `check_image` on a copy: '' nothing,
    'resave' (a JPEG without the FFD9 end marker, re-saved in place) or 'truncated' (check_image fails on it, so the
    scan drops the image as corrupt). Only files `rewritten_by_scan` are copied."""
    if not rewritten_by_scan(path):
        return ""
    with tempfile.TemporaryDirectory(prefix="atcache-check-") as tmp:
        probe = Path(tmp) / f"probe{Path(path).suffix}"
        shutil.copyfile(path, probe)
        try:
            message, _ = check_image(str(probe))
        except Exception:  # noqa: BLE001 - any failure drops the image from ultralytics' training
            return "truncated"
    return "resave" if message else ""


def restore_like_check_image(src: str | Path, dst: str | Path) -> None:
    """Write to `dst` exactly what ultralytics' `check_image` re-saves for the JPEG `src` (its own code, on a copy)."""
    shutil.copyfile(src, dst)
    check_image(str(dst))


def resize_long_side(im: np.ndarray, imgsz: int) -> np.ndarray:
    """`BaseDataset.load_image` (rect_mode, training) for an image already decoded: long side -> imgsz, the short
    side rounded up, INTER_LINEAR (8.4.150-8.4.190; tests/data/test_data.py compares it with load_image)."""
    h0, w0 = im.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        w, h = min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    return im


def centred_letterbox(imgsz: int, pad_value: int = PAD_VALUE) -> LetterBox:
    """ultralytics' LetterBox as its un-augmented dataset uses it (no upscaling), centred, grey `pad_value`."""
    return LetterBox(new_shape=(imgsz, imgsz), scaleup=False, center=True, padding_value=pad_value)


def letterbox_pad(sample: dict) -> tuple[int, int]:
    """(top, left) padding `LetterBox` put around a sample's image: it records (left, top) in `ratio_pad[1]`."""
    left, top = sample["ratio_pad"][1]
    return int(top), int(left)


class TeacherInputs(YOLODataset):
    """Exactly the given image files as ultralytics' un-augmented training input (see the module's docstring):
    `self[i]` is ultralytics' sample dict ('img' (3, imgsz, imgsz) uint8 RGB, 'ori_shape', 'ratio_pad', 'cls' (k, 1)
    and 'bboxes' (k, 4) normalised xywh of the letterboxed image, 'batch_idx', ...) with LOADED_SHAPE_KEY added.

    Without `labels` every image has no boxes. With `labels`, boxes are the image's label file as ultralytics' scan
    reads it (`names`: the dataset's classes); an image the scan drops (too small, unreadable labels) has none, and
    one the scan would re-save (`rewritten_by_scan`) raises ValueError instead of being touched. Loading an image
    that cannot be decoded raises ultralytics' FileNotFoundError."""

    def __init__(self, files: Sequence[str | Path], imgsz: int, names: Sequence[str] = (), labels: bool = False,
                 pad_value: int = PAD_VALUE):
        self._files = [os.fspath(f) for f in files]
        self._read_labels, self._pad_value = labels, pad_value
        self._verify = self._verify_args = None
        data = {"names": dict(enumerate(names)) or {0: "object"}, "channels": 3}
        super().__init__(img_path=self._files, imgsz=imgsz, augment=False, cache=False, hyp=DEFAULT_CFG, prefix="",
                         data=data, task="detect")

    def __getitem__(self, index: int) -> dict:
        with _untraced():
            return super().__getitem__(index)

    def get_img_files(self, img_path) -> list[str]:
        return list(self._files)  # the rows as given: not listed again, nothing dropped

    def get_labels(self) -> list[dict]:
        self.get_label_files()
        if self._read_labels:
            self._verify, args = self.verify_args()
            self._verify_args = list(args)  # one tuple per image, verified when it is loaded
        return [self._no_boxes(f) for f in self.im_files]

    @staticmethod
    def _no_boxes(im_file: str) -> dict:
        return {"im_file": im_file, "cls": np.zeros((0, 1), np.float32), "bboxes": np.zeros((0, 4), np.float32),
                "segments": [], "keypoints": None, "normalized": True, "bbox_format": "xywh"}

    def build_transforms(self, hyp=None) -> Compose:
        return Compose([centred_letterbox(self.imgsz, self._pad_value),
                        Format(bbox_format="xywh", normalize=True, batch_idx=True, bgr=0.0)])

    def get_image_and_label(self, index: int) -> dict:
        if self._verify is not None and self.labels[index].get("verified") is None:
            self.labels[index] = self._verified(index)
        label = super().get_image_and_label(index)
        label.pop("verified", None)
        label[LOADED_SHAPE_KEY] = tuple(int(x) for x in label["resized_shape"])
        return label

    def _verified(self, index: int) -> dict:
        """Image `index`'s labels as ultralytics' scan makes them (boxes only: the teacher's loss needs no polygons)."""
        im_file = self.im_files[index]
        if rewritten_by_scan(im_file):
            raise ValueError(f"{im_file} is a JPEG that ultralytics' scan would re-save; not reading its labels")
        label = self.result_to_label(self._verify(self._verify_args[index]))[0]
        label = self._no_boxes(im_file) if label is None else {**label, "segments": [], "keypoints": None}
        label.pop("shape", None)
        return {**label, "verified": True}
