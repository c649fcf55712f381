"""Datasets as ultralytics sees them: data YAML -> split image files, the dataset fingerprint, and the exact
un-augmented teacher input (ultralytics' load_image, then a centred 114-grey letterbox)."""

from __future__ import annotations

import glob
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from atcache.errors import AtcacheError, first_line
from atcache.cache.format import LETTERBOX_COLUMNS

PAD_VALUE = 114
ULTRALYTICS_IMREAD_FLAGS = cv2.IMREAD_COLOR  # BaseDataset.cv2_flag for channels=3: imread gives 8-bit BGR


@dataclass(frozen=True)
class SplitFiles:
    """The images of one split of a data YAML, in ultralytics' order, with paths relative to the dataset root."""

    root: Path
    split: str
    files: tuple[str, ...]  # relative to root, posix separators
    data_yaml: str
    names: tuple[str, ...]

    def absolute(self, i: int) -> Path:
        return self.root / self.files[i]

    def fingerprint(self) -> str:
        """sha256 over 'relative path <TAB> size in bytes' of every image, in row order."""
        h = hashlib.sha256()
        for rel in self.files:
            try:
                size = (self.root / rel).stat().st_size
            except OSError:
                size = -1
            h.update(f"{rel}\t{size}\n".encode())
        return h.hexdigest()


def load_data_yaml(data_yaml: str | Path) -> dict:
    """Parse and resolve a detection data YAML with ultralytics' own check (never downloads)."""
    path = Path(data_yaml)
    if not path.is_file():
        raise AtcacheError(f"data YAML {data_yaml} does not exist; pass the YAML written by `atcache prepare-voc` or your own")
    from atcache.yolo import check_det_dataset

    try:
        return check_det_dataset(str(path), autodownload=False)
    except Exception as e:  # ultralytics raises several types with multi-line messages
        raise AtcacheError(f"data YAML {data_yaml} is not usable: {first_line(e)}") from e


def split_files(data_yaml: str | Path, split: str) -> SplitFiles:
    """The image files of `split` ('train', 'val', 'test') exactly as ultralytics' BaseDataset.get_img_files lists them
    (label files without an image are ignored, as ultralytics ignores them); AtcacheError if it has none."""
    from atcache.yolo import IMG_FORMATS

    data = load_data_yaml(data_yaml)
    if not data.get(split):
        known = [k for k in ("train", "val", "test", "minival") if data.get(k)]
        raise AtcacheError(f"split {split!r} is not in {data_yaml}; choose one of {', '.join(known)}")
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    found: list[str] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found += glob.glob(str(Path(glob.escape(str(p))) / "**" / "*.*"), recursive=True)
        elif p.is_file():
            lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
            parent = str(p.parent) + os.sep
            found += [x.replace("./", parent, 1) if x.startswith("./") else x for x in lines]
        else:
            raise AtcacheError(f"split {split!r} of {data_yaml} points to {p}, which does not exist")
    images = sorted(x.replace("/", os.sep) for x in found if x.rpartition(".")[-1].lower() in IMG_FORMATS)
    if not images:
        raise AtcacheError(
            f"split {split!r} of {data_yaml} has no images under {', '.join(map(str, entries))} (label files alone "
            f"do not count); put the images there or point {split!r} at the folder or list that holds them"
        )
    if data.get("channels", 3) != 3:
        raise AtcacheError(
            f"{data_yaml} sets channels: {data['channels']}, but atcache caches 3-channel (BGR) teachers only; "
            "remove 'channels' from the data YAML or train without the cache"
        )
    root = Path(data["path"]).resolve()
    rel = tuple(relative_to_root(x, root) for x in images)
    for r in rel:
        try:
            r.encode("utf-8")
        except UnicodeEncodeError:
            raise AtcacheError(
                f"image file name {r!r} under {root} is not valid UTF-8 and cannot be a cache key; rename it to "
                "UTF-8 (e.g. `convmv -f latin1 -t utf8 --notest`)"
            ) from None
    names = tuple(data["names"][i] for i in sorted(data["names"])) if isinstance(data["names"], dict) else tuple(data["names"])
    return SplitFiles(root=root, split=split, files=rel, data_yaml=str(Path(data_yaml).resolve()), names=names)


def relative_to_root(path: str | Path, root: Path) -> str:
    """An image's key in a cache: its resolved path relative to the resolved dataset root, posix separators."""
    return Path(os.path.relpath(Path(path).resolve(), root)).as_posix()


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 (H, W, 3) exactly as ultralytics' training loader decodes it (grey, CMYK, 16-bit, alpha included);
    AtcacheError naming the file and the fix if it is missing, undecodable, or a JPEG ultralytics would re-save."""
    from atcache.yolo import imread

    if not Path(path).is_file():
        raise AtcacheError(f"image {path} does not exist; restore it or rebuild the data with prepare-voc (or pass --skip-bad)")
    im = imread(str(path), flags=ULTRALYTICS_IMREAD_FLAGS)
    state = jpeg_end_state(path)
    if state == "truncated":
        raise AtcacheError(
            f"image {path} is a truncated or corrupt JPEG (no FFD9 end marker), which ultralytics drops from training as "
            "corrupt; replace it with a complete copy or delete it (or pass --skip-bad)"
        )
    if state == "resave":
        raise AtcacheError(
            f"image {path} is a JPEG that does not end with its FFD9 end marker, which ultralytics re-saves (new "
            "pixels and size) when it first scans the data, so a cache of it would not match training; re-save it as "
            f"ultralytics does: python -c \"from ultralytics.data.utils import check_image; check_image({str(path)!r})\" "
            "(or pass --skip-bad)"
        )
    if im is None or im.size == 0:
        raise AtcacheError(f"image {path} cannot be decoded (corrupt or not an image); replace it or pass --skip-bad")
    if im.ndim != 3 or im.shape[2] != 3:
        raise AtcacheError(f"image {path} decodes to shape {im.shape}, not 3 colour channels; re-save it as RGB or pass --skip-bad")
    return im


def jpeg_end_state(path: str | Path) -> str:
    """What ultralytics' label scan (data.utils.check_image) does to this file: '' nothing, 'resave' (a JPEG without
    the FFD9 end marker that it re-saves in place) or 'truncated' (the re-save fails and it drops the image)."""
    with open(path, "rb") as f:
        head = f.read(3)
        f.seek(0, os.SEEK_END)
        if f.tell() < 4 or head != b"\xff\xd8\xff":  # what PIL's JPEG plugin accepts
            return ""
        f.seek(-2, os.SEEK_END)
        if f.read() == b"\xff\xd9":
            return ""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if im.format != "JPEG":  # check_image looks at format JPEG only (not MPO)
                return ""
            ImageOps.exif_transpose(im).load()
    except Exception:  # check_image's re-save fails the same way, and ultralytics drops the image
        return "truncated"
    return "resave"


def restore_jpeg(src: str | Path, dst: str | Path) -> None:
    """Write to `dst` exactly what ultralytics' check_image re-saves for the JPEG `src` (upright, quality 100, 4:4:4)."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        ImageOps.exif_transpose(im).save(str(dst), "JPEG", subsampling=0, quality=100)


def resize_long_side(im: np.ndarray, imgsz: int) -> np.ndarray:
    """ultralytics BaseDataset.load_image (rect_mode, training): long side -> imgsz with ceil, INTER_LINEAR."""
    h0, w0 = im.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        w, h = min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    return im


def _letterbox_pads(h: int, w: int, imgsz: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of ultralytics LetterBox(center=True) for an already-resized (h, w) image."""
    dh, dw = (imgsz - h) / 2, (imgsz - w) / 2
    return round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)


def letterbox_image(im: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """(padded BGR (imgsz, imgsz, 3), letterbox row (len(LETTERBOX_COLUMNS),) float32 in that column order)."""
    h0, w0 = im.shape[:2]
    resized = resize_long_side(im, imgsz)
    h, w = resized.shape[:2]
    top, bottom, left, right = _letterbox_pads(h, w, imgsz)
    out = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    values = {"h0": h0, "w0": w0, "h": h, "w": w, "pad_top": top, "pad_left": left, "ratio": h / h0}
    row = np.array([values[c] for c in LETTERBOX_COLUMNS], dtype=np.float32)
    return out, row


def to_tensor(im_bgr: np.ndarray) -> torch.Tensor:
    """BGR (H, W, 3) uint8 -> RGB (3, H, W) uint8 tensor, as ultralytics' Format transform produces."""
    return torch.from_numpy(np.ascontiguousarray(im_bgr.transpose(2, 0, 1)[::-1]))


class LetterboxedImages(torch.utils.data.Dataset):
    """Rows of a split as teacher inputs, for a DataLoader with workers (decoding overlaps the GPU).

    Each item is (row, image (3, imgsz, imgsz) uint8 RGB, letterbox row (len(LETTERBOX_COLUMNS),), error message or ''). A bad image is
    returned as a grey image with its error instead of raising, so the parent decides (fail or --skip-bad)."""

    def __init__(self, split: SplitFiles, rows: list[int] | np.ndarray, imgsz: int):
        self.split, self.rows, self.imgsz = split, list(rows), imgsz

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        row = self.rows[k]
        try:
            im, lb = letterbox_image(read_image(self.split.absolute(row)), self.imgsz)
            return row, to_tensor(im), torch.from_numpy(lb), ""
        except AtcacheError as e:
            blank = torch.full((3, self.imgsz, self.imgsz), PAD_VALUE, dtype=torch.uint8)
            return row, blank, torch.full((len(LETTERBOX_COLUMNS),), float("nan")), str(e)
