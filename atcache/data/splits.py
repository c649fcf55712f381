"""Datasets as ultralytics sees them: data YAML -> split image files, the dataset fingerprint, and the exact
un-augmented teacher input (ultralytics' load_image, then a centred 114-grey letterbox), all made by ultralytics' own
code through atcache.yolo.images."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from atcache.errors import AtcacheError, first_line
from atcache.cache.format import LETTERBOX_COLUMNS, Letterbox

PAD_VALUE = Letterbox().pad_value  # the cache records it; ultralytics' LetterBox pads with it


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
    """The image files of `split` ('train', 'val', 'test') listed by ultralytics' own BaseDataset.get_img_files, in its
    order (label files without an image are ignored, as ultralytics ignores them); AtcacheError if it has none."""
    from atcache.yolo.images import list_images

    data = load_data_yaml(data_yaml)
    if not data.get(split):
        known = [k for k in ("train", "val", "test", "minival") if data.get(k)]
        raise AtcacheError(f"split {split!r} is not in {data_yaml}; choose one of {', '.join(known)}")
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    for entry in entries:
        if not Path(entry).exists():
            raise AtcacheError(f"split {split!r} of {data_yaml} points to {entry}, which does not exist")
    try:
        images = list_images(data[split])
    except FileNotFoundError:  # ultralytics: no images there
        raise AtcacheError(
            f"split {split!r} of {data_yaml} has no images under {', '.join(map(str, entries))} (label files alone "
            f"do not count); put the images there or point {split!r} at the folder or list that holds them"
        ) from None
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


def _refuse_unusable(path: str | Path) -> None:
    """AtcacheError naming the file and the fix if it is missing or a JPEG that ultralytics' scan would re-save or drop
    (its check_image, run on a copy): the checks made before decoding."""
    if not Path(path).is_file():
        raise AtcacheError(f"image {path} does not exist; restore it or rebuild the data with prepare-voc (or pass --skip-bad)")
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


def _undecodable(path: str | Path) -> AtcacheError:
    return AtcacheError(f"image {path} cannot be decoded (corrupt or not an image); replace it or pass --skip-bad")


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 (H, W, 3) exactly as ultralytics' training loader decodes it (grey, CMYK, 16-bit, alpha included),
    at its original size; AtcacheError naming the file and the fix if it is missing, undecodable, or a JPEG ultralytics
    would re-save. (The teacher's input is `teacher_input` / `LetterboxedImages`: decoded and resized by ultralytics.)"""
    from atcache.yolo.images import decode

    _refuse_unusable(path)
    im = decode(path)
    if im is None or im.size == 0:
        raise _undecodable(path)
    if im.ndim != 3 or im.shape[2] != 3:
        raise AtcacheError(f"image {path} decodes to shape {im.shape}, not 3 colour channels; re-save it as RGB or pass --skip-bad")
    return im


def jpeg_end_state(path: str | Path) -> str:
    """What ultralytics' label scan (data.utils.check_image, run on a copy) does to this file: '' nothing, 'resave' (a
    JPEG without the FFD9 end marker that it re-saves in place) or 'truncated' (the re-save fails and it drops the
    image)."""
    from atcache.yolo.images import check_image_outcome

    return check_image_outcome(path)


def restore_jpeg(src: str | Path, dst: str | Path) -> None:
    """Write to `dst` exactly what ultralytics' check_image re-saves for the JPEG `src` (its own code, on a copy)."""
    from atcache.yolo.images import restore_like_check_image

    restore_like_check_image(src, dst)


def resize_long_side(im: np.ndarray, imgsz: int) -> np.ndarray:
    """ultralytics BaseDataset.load_image (rect_mode, training) for an image already decoded: long side -> imgsz."""
    from atcache.yolo.images import resize_long_side as resize

    return resize(im, imgsz)


def letterbox_image(im: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """For an image already decoded (BGR): (padded BGR (imgsz, imgsz, 3), letterbox row (len(LETTERBOX_COLUMNS),)
    float32) as `teacher_input` gives for its file: load_image's resize, then ultralytics' centred LetterBox."""
    from atcache.yolo.images import centred_letterbox, letterbox_pad, resize_long_side as resize

    resized = resize(im, imgsz)
    sample = centred_letterbox(imgsz, PAD_VALUE)({"img": resized, "ratio_pad": (1.0, 1.0)})
    return sample["img"], _letterbox_row(im.shape[:2], resized.shape[:2], letterbox_pad(sample))


def _letterbox_row(hw0, hw, pad) -> np.ndarray:
    """A row of the letterbox table (LETTERBOX_COLUMNS, float32) from the original and resized (h, w) and (top, left)."""
    (h0, w0), (h, w), (top, left) = hw0, hw, pad
    values = {"h0": h0, "w0": w0, "h": h, "w": w, "pad_top": top, "pad_left": left, "ratio": h / h0}
    return np.array([values[c] for c in LETTERBOX_COLUMNS], dtype=np.float32)


def teacher_input(path: str | Path, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """(padded BGR (imgsz, imgsz, 3) uint8, letterbox row) of one image file, as build-cache feeds it to the teacher
    (a `LetterboxedImages` item, back in OpenCV's layout); AtcacheError for an image it could not use."""
    split = SplitFiles(root=Path(path).parent, split="", files=(Path(path).name,), data_yaml="", names=())
    _, image, letterbox, error = LetterboxedImages(split, [0], imgsz)[0]
    if error:
        raise AtcacheError(error)
    return np.ascontiguousarray(image.numpy()[::-1].transpose(1, 2, 0)), letterbox.numpy()


class LetterboxedImages(torch.utils.data.Dataset):
    """Rows of a split as teacher inputs, for a DataLoader with workers (decoding overlaps the GPU): ultralytics'
    un-augmented training input of each row's file, by its own code (`atcache.yolo.images.TeacherInputs`: load_image,
    a centred grey LetterBox, Format).

    Each item is (row, image (3, imgsz, imgsz) uint8 RGB, letterbox row (len(LETTERBOX_COLUMNS),), error message or
    ''), and with `labels` also the row's labels ({'cls' (k, 1), 'bboxes' (k, 4)} normalised xywh of the letterboxed
    image, as ultralytics' scan reads them): batch those with `collate`. A bad image is returned as a grey image, no
    boxes and its error instead of raising, so the parent decides (fail or --skip-bad)."""

    def __init__(self, split: SplitFiles, rows: list[int] | np.ndarray, imgsz: int, labels: bool = False):
        from atcache.yolo.images import TeacherInputs

        self.split, self.rows, self.imgsz, self.labels = split, [int(r) for r in rows], imgsz, labels
        self.inputs = TeacherInputs([split.absolute(r) for r in self.rows], imgsz, names=split.names, labels=labels,
                                    pad_value=PAD_VALUE)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        from atcache.yolo.images import LOADED_SHAPE_KEY, letterbox_pad

        row, path = self.rows[k], self.split.absolute(self.rows[k])
        try:
            _refuse_unusable(path)
            try:
                sample = self.inputs[k]
            except (FileNotFoundError, cv2.error):  # ultralytics' load_image: "Image Not Found" when imread fails
                raise _undecodable(path) from None
            if tuple(sample["img"].shape) != (3, self.imgsz, self.imgsz):
                raise AtcacheError(f"image {path} decodes to {tuple(sample['img'].shape)}, not 3 colour channels; "
                                   "re-save it as RGB or pass --skip-bad")
            item = (row, sample["img"], torch.from_numpy(_letterbox_row(sample["ori_shape"], sample[LOADED_SHAPE_KEY],
                                                                        letterbox_pad(sample))), "")
            labels = {"cls": sample["cls"].float().reshape(-1, 1), "bboxes": sample["bboxes"].float().reshape(-1, 4)}
        except AtcacheError as e:
            blank = torch.full((3, self.imgsz, self.imgsz), PAD_VALUE, dtype=torch.uint8)
            item = (row, blank, torch.full((len(LETTERBOX_COLUMNS),), float("nan")), str(e))
            labels = {"cls": torch.zeros((0, 1)), "bboxes": torch.zeros((0, 4))}
        return (*item, labels) if self.labels else item

    @staticmethod
    def collate(items: list[tuple]):
        """(rows, images, letterbox, errors, labels): labels {'batch_idx', 'cls', 'bboxes'} of the whole batch as
        ultralytics' collate_fn makes them (None for items without labels)."""
        from atcache.yolo import YOLODataset

        rows, images, letterbox, errors = torch.utils.data.default_collate([item[:4] for item in items])
        if len(items[0]) == 4:
            return rows, images, letterbox, errors, None
        labels = YOLODataset.collate_fn([{**item[4], "batch_idx": torch.zeros(len(item[4]["cls"]))} for item in items])
        return rows, images, letterbox, errors, labels
