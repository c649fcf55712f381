"""`atcache prepare-voc`: Pascal VOC XML -> the layout ultralytics reads (images/, labels/, a data YAML).

What the input is (a VOCdevkit, a folder an annotation tool exported, or its train/, valid/, test/ split folders) and
how it splits: atcache.data.voc_layouts. A VOCdevkit becomes the layout of ultralytics' VOC.yaml (images/train2012, ...,
VOC.yaml); an export becomes images/{train,val[,test]} and data.yaml. Boxes: ultralytics' VOC conversion (-1 offset,
`difficult` dropped unless --keep-difficult), clipped to the image; no area left: dropped. Every object is counted
(VocResult.summary). All is parsed and checked before anything is written; images are hard-linked (copied across
filesystems), so the input stays intact and reruns are idempotent; a JPEG without its FFD9 end marker is written as
ultralytics' first scan re-saves it."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from atcache.data.voc_layouts import Item, Plan, and_more, devkit_plan, export_plan, find_devkit
from atcache.errors import AtcacheError, first_line

VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_box_to_yolo(w: int, h: int, xmin: float, xmax: float, ymin: float, ymax: float) -> tuple[float, float, float, float]:
    """ultralytics' convert_box: VOC 1-based pixel box -> normalised (x_center, y_center, width, height)."""
    x, y = (xmin + xmax) / 2.0 - 1, (ymin + ymax) / 2.0 - 1
    return x / w, y / h, (xmax - xmin) / w, (ymax - ymin) / h


def clip_yolo_box(box: tuple[float, float, float, float]) -> tuple[tuple[float, float, float, float], bool]:
    """(box clipped to the unit square, whether it had to be); a box inside it comes back unchanged, bit for bit."""
    x, y, w, h = box
    x1, y1, x2, y2 = x - w / 2, y - h / 2, x + w / 2, y + h / 2
    if min(x1, y1) >= 0 and max(x2, y2) <= 1:
        return box, False
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), True


@dataclass
class VocResult:
    """What `prepare-voc` wrote, and where every object in the XML went: objects = written (label lines) +
    difficult_dropped + sum(skipped.values()) + degenerate."""

    data_yaml: Path
    names: tuple[str, ...]
    images: dict[str, int]  # split folder -> images written there
    split_note: str
    keep_difficult: bool
    lines: dict[str, int]  # class -> label lines written
    skipped: dict[str, int]  # --skip-classes class -> objects dropped
    objects: int = 0  # objects in the converted images' XML
    difficult_dropped: int = 0
    difficult_kept: int = 0
    degenerate: int = 0  # dropped: no width or height left inside the image
    clipped: int = 0  # written, clipped to the image
    empty: int = 0  # images without a label line
    background: int = 0  # images without XML (empty label file)
    unlisted: int = 0  # images of an export in no ImageSets/Main list, left out
    stale: int = 0  # files of an earlier run removed from the split folders
    notes: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(self.lines.values())

    def summary(self) -> list[str]:
        """The lines `atcache prepare-voc` prints before `dataset ready: <yaml>`."""
        splits = ", ".join(f"{k} {v}" for k, v in self.images.items() if v)
        background = f" ({self.background} without XML, kept as background images)" if self.background else ""
        out = [f"images: {sum(self.images.values())} ({splits}; {self.split_note})",
               "label lines per class: " + ", ".join(f"{i} {n}: {self.lines[n]}" for i, n in enumerate(self.names)),
               f"objects: {self.objects} in the XML = {self.written} label lines + {self.difficult_dropped} difficult "
               f"dropped + {sum(self.skipped.values())} of skipped classes + {self.degenerate} degenerate boxes dropped",
               f"difficult: {self.difficult_kept} kept (--keep-difficult)" if self.keep_difficult else
               f"difficult: {self.difficult_dropped} dropped (add --keep-difficult to keep them)",
               "skipped classes (--skip-classes): " + ", ".join(f"{n} {c}" for n, c in self.skipped.items()),
               f"degenerate boxes: {self.degenerate} dropped (no width or height left inside the image); "
               f"{self.clipped} boxes clipped to the image",
               f"images without objects: {self.empty}{background}",
               f"unlisted: {self.unlisted} images in no ImageSets/Main list, left out",
               f"removed {self.stale} files an earlier run left in the split folders"]
        shown = (1, 1, 1, 1, self.skipped, 1, 1, self.unlisted, self.stale)
        return [line for line, show in zip(out, shown) if show] + self.notes


def _check_options(classes, skip_classes, val_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--classes and --skip-classes (tuples, or comma-separated text) as stripped names, each once, in one of them."""
    out = []
    for value, option in ((classes, "--classes"), (skip_classes, "--skip-classes")):
        names = [n for n in (n.strip() for n in (value.split(",") if isinstance(value, str) else value)) if n]
        twice = [n for n, c in Counter(names).items() if c > 1]
        if twice:
            raise AtcacheError(f"{option} names {twice[0]!r} twice; give each class once")
        out.append(tuple(names))
    both = [n for n in out[0] if n in out[1]]
    if both:
        raise AtcacheError(f"class {both[0]!r} is in both --classes and --skip-classes; give it in one of them")
    if not 0 <= val_fraction < 1:
        raise AtcacheError(f"--val-fraction {val_fraction} is outside [0, 1); give the share to validate on, e.g. 0.2")
    return out[0], out[1]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (or copy) the source image; one that ultralytics would re-save becomes that re-saved copy."""
    from atcache.data.splits import jpeg_end_state, restore_jpeg

    if jpeg_end_state(src) == "resave":  # truncated ones were refused by _check_images
        tmp = dst.with_name(f".{dst.name}.tmp")
        restore_jpeg(src, tmp)
        tmp.unlink() if dst.exists() and dst.read_bytes() == tmp.read_bytes() else os.replace(tmp, dst)
    elif not (dst.exists() and dst.stat().st_size == src.stat().st_size):
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _class_names(plan: Plan, classes: tuple[str, ...], skip: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """(the class names in id order, notes for the summary); an object of a class neither named nor skipped is an
    error naming the class, its count and its first file."""
    pairs = [(obj.name, item.ann.xml) for item in plan.items if item.ann for obj in item.ann.objects]
    counts, first = Counter(n for n, _ in pairs), {}
    for name, xml in pairs:
        first.setdefault(name, xml)
    found = [n for n in first if n not in skip]  # in order of first appearance
    unknown = [n for n in found if classes and n not in classes]
    if unknown:
        name, more = unknown[0], and_more(unknown, f" unknown classes: {', '.join(unknown[1:4])}")
        alike = [c for c in classes if c.lower() == name.lower()]
        case = f" (names are case-sensitive: --classes has {alike[0]!r})" if alike else ""
        raise AtcacheError(f"class {name!r} ({counts[name]} object{'s' * (counts[name] != 1)}, first in {first[name]}) is "
                           f"not in --classes {','.join(classes)}{case}{more}; add it to --classes or drop its objects "
                           f"with --skip-classes {name}")
    if classes:
        names = classes
    elif plan.devkit and set(found) <= set(VOC_NAMES):  # VOC's ids, as ultralytics' VOC.yaml has them
        names = tuple(n for n in VOC_NAMES if n not in skip)
    else:
        names = tuple(sorted(found))
    lower = Counter(n.lower() for n in names)
    alike = sorted(n for n in names if lower[n.lower()] > 1)
    return names, [f"note: classes {', '.join(alike)} differ only in case and are kept apart; rename them in the XML "
                   "(or pass --classes) to merge them"] if alike else []


def _check_images(items: list[Item], remove: str, progress: bool) -> dict[Path, tuple[int, int]]:
    """The real (EXIF-upright, as ultralytics reads it) size of every image, from its header; one error for an
    unreadable or truncated image, or an XML <size> that is not the image's."""
    from PIL import Image
    from tqdm import tqdm

    from atcache.data.splits import jpeg_end_state
    from atcache.yolo import exif_size

    sizes, wrong = {}, []
    for item in tqdm(items, desc="prepare-voc: checking", unit="img", disable=not progress, delay=2, leave=False):
        if jpeg_end_state(item.image) == "truncated":
            raise AtcacheError(f"image {item.image} is a truncated or corrupt JPEG (no FFD9 end marker), which "
                               f"ultralytics drops from training; {remove}")
        try:
            with Image.open(item.image) as im:
                size, stored = tuple(exif_size(im)), im.size
            sizes[item.image] = size
        except Exception as e:
            raise AtcacheError(f"image {item.image} cannot be read ({first_line(e)}); {remove}") from None
        if item.ann is not None and item.ann.size is not None and item.ann.size != size:
            wrong.append((item, size, stored))
    if wrong:
        (item, size, stored), show = wrong[0], lambda s: f"{s[0]:g}x{s[1]:g}"
        exif = (f", {show(stored)} before its EXIF rotation: boxes drawn on the unrotated image"
                if item.ann.size == tuple(stored) != size else "")
        raise AtcacheError(f"annotation {item.ann.xml} says <size> {show(item.ann.size)} but its image {item.image.name} "
                           f"is {show(size)}{exif}{and_more(wrong)}; correct <size> in the XML or re-export the "
                           "annotations")
    return sizes


def _label_text(item: Item, size: tuple[int, int], ids: dict[str, int], result: VocResult) -> str:
    """The image's YOLO label lines, counting every object in `result` (written, or the reason it was dropped)."""
    lines = []
    for obj in item.ann.objects if item.ann else ():
        result.objects += 1
        if obj.name not in ids:  # a --skip-classes class: the others were refused by _class_names
            result.skipped[obj.name] += 1
            continue
        if obj.difficult and not result.keep_difficult:
            result.difficult_dropped += 1
            continue
        box, clipped = clip_yolo_box(voc_box_to_yolo(*size, *obj.box))
        if not (box[2] > 0 and box[3] > 0):
            result.degenerate += 1
            continue
        result.clipped += clipped
        result.difficult_kept += obj.difficult
        result.lines[obj.name] += 1
        lines.append(" ".join(str(v) for v in (ids[obj.name], *box)))
    result.empty += not lines
    result.background += item.ann is None
    return "".join(line + "\n" for line in lines)


def convert_voc(devkit: str | Path, out: str | Path, progress: bool = True, *, classes=(), skip_classes=(),
                keep_difficult: bool = False, val_fraction: float = 0.2, seed: int = 0) -> VocResult:
    """Convert a VOCdevkit, or a folder of images and Pascal VOC XML as annotation tools export it, into `out` (all
    checked before anything is written); returns the data YAML written there and the counts of every object."""
    from tqdm import tqdm

    from atcache.yolo import IMG_FORMATS

    classes, skip = _check_options(classes, skip_classes, val_fraction)
    source, out = Path(devkit), Path(out).resolve()
    kit = find_devkit(source)
    if kit is None and source.is_dir() and source.resolve() == out:
        raise AtcacheError(f"--out {out} is the input folder; write the dataset to another folder")
    plan = devkit_plan(kit) if kit is not None else export_plan(source, val_fraction, seed)
    names, notes = _class_names(plan, classes, skip)
    sizes = _check_images(plan.items, "restore it from the VOC archive or remove its id from the ImageSets list"
                          if plan.devkit else "restore it, or remove it and its XML", progress)
    ids = {n: i for i, n in enumerate(names)}
    result = VocResult(out / plan.yaml_name, names, dict.fromkeys(plan.folders, 0), plan.split_note, keep_difficult,
                       dict.fromkeys(names, 0), dict.fromkeys(skip, 0), unlisted=plan.unlisted, notes=notes)
    labels = [_label_text(item, sizes[item.image], ids, result) for item in plan.items]

    for folder in (out / kind / f for kind in ("images", "labels") for f in plan.folders):
        folder.mkdir(parents=True, exist_ok=True)
    keep = set()
    for item, text in tqdm(list(zip(plan.items, labels)), desc="prepare-voc", unit="img", disable=not progress):
        image, label = out / "images" / item.split / item.image.name, out / "labels" / item.split / f"{item.stem}.txt"
        _link_or_copy(item.image, image)
        if not label.exists() or label.read_text() != text:
            label.write_text(text)
        keep |= {image, label}
        result.images[item.split] += 1
    for kind, suffixes in (("images", IMG_FORMATS), ("labels", {"txt"})):  # an earlier run's other split or lists
        for p in (p for folder in plan.folders for p in (out / kind / folder).iterdir()):
            if p.suffix[1:].lower() in suffixes and p not in keep and p.is_file():
                p.unlink()
                result.stale += 1
    data = {"path": str(out), **plan.dirs, "names": dict(enumerate(names))}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not result.data_yaml.exists() or result.data_yaml.read_text(encoding="utf-8") != text:
        result.data_yaml.write_text(text, encoding="utf-8")
    return result


def prepare_voc(devkit: str | Path, out: str | Path, progress: bool = True, **options) -> Path:
    """convert_voc(...), returning the data YAML it wrote (the form the demo, study and bench use); `options` are
    convert_voc's (classes, skip_classes, keep_difficult, val_fraction, seed)."""
    return convert_voc(devkit, out, progress, **options).data_yaml
