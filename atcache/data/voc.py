"""`atcache prepare-voc`: a local VOCdevkit -> the layout ultralytics' VOC.yaml produces (images/, labels/, a data YAML).

The conversion is the one in ultralytics' VOC.yaml download script (boxes to normalised xywh with its -1 offset,
`difficult` objects dropped), except that images are hard-linked (copied across filesystems), not moved, so the
devkit stays intact and reruns are idempotent. The ImageSets lists define the dataset: annotations of unlisted ids are
ignored, a listed id without its JPEG or XML is an error. A JPEG without its FFD9 end marker is written as the copy
ultralytics' first training scan would re-save it to (a truncated one that cannot be re-saved is an error)."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from atcache.errors import AtcacheError

VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

VOC_SETS = (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test"))
TRAIN_DIRS = ("images/train2012", "images/train2007", "images/val2012", "images/val2007")
VAL_DIRS = ("images/test2007",)


def voc_box_to_yolo(w: int, h: int, xmin: float, xmax: float, ymin: float, ymax: float) -> tuple[float, float, float, float]:
    """ultralytics' convert_box: VOC 1-based pixel box -> normalised (x_center, y_center, width, height)."""
    x, y = (xmin + xmax) / 2.0 - 1, (ymin + ymax) / 2.0 - 1
    return x / w, y / h, (xmax - xmin) / w, (ymax - ymin) / h


def _convert_annotation(xml_path: Path) -> list[str]:
    """YOLO label lines for one VOC XML; AtcacheError naming the file if it is malformed."""
    try:
        root = ET.parse(xml_path).getroot()
        size = root.find("size")
        w, h = int(size.find("width").text), int(size.find("height").text)
        lines = []
        for obj in root.iter("object"):
            name = obj.find("name").text.strip()
            difficult = obj.find("difficult")
            if name in VOC_NAMES and (difficult is None or int(difficult.text) != 1):
                bb = obj.find("bndbox")
                box = voc_box_to_yolo(w, h, *(float(bb.find(t).text) for t in ("xmin", "xmax", "ymin", "ymax")))
                lines.append(" ".join(str(v) for v in (VOC_NAMES.index(name), *box)))
        return lines
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise AtcacheError(f"annotation {xml_path} is malformed ({e}); fix or remove it from the ImageSets list") from e


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (or copy) the devkit image; one that ultralytics would re-save becomes that re-saved copy."""
    from atcache.data.splits import jpeg_end_state, restore_jpeg

    if jpeg_end_state(src) == "resave":  # truncated ones were refused by _check_listed_files
        tmp = dst.with_name(f".{dst.name}.tmp")
        restore_jpeg(src, tmp)
        if dst.exists() and dst.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            os.replace(tmp, dst)
        return
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _find_devkit(devkit: str | Path) -> Path:
    """Accept PATH/VOCdevkit, or its parent, as long as VOC2007 or VOC2012 is inside."""
    p = Path(devkit)
    for cand in (p, p / "VOCdevkit", p / "images" / "VOCdevkit"):
        if (cand / "VOC2007").is_dir() or (cand / "VOC2012").is_dir():
            return cand
    raise AtcacheError(f"{devkit} holds no VOC2007/ or VOC2012/ folder; pass the VOCdevkit directory")


def _check_listed_files(devkit: Path, work: list[tuple[str, str, str]]) -> None:
    """Before writing anything: every listed id has its JPEG and XML, and no JPEG is truncated; else one error naming
    the first bad file."""
    missing = [(devkit / f"VOC{y}" / sub / f"{i}{ext}", s) for y, s, i in work
               for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"))
               if not (devkit / f"VOC{y}" / sub / f"{i}{ext}").is_file()]
    if missing:
        (path, image_set), more = missing[0], f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        kind = "image" if path.suffix == ".jpg" else "annotation"
        raise AtcacheError(f"{kind} {path} is listed in ImageSets/Main/{image_set}.txt but missing{more}; restore it "
                           "or remove the id from the list")
    from atcache.data.splits import jpeg_end_state  # imports torch: only when converting

    for y, _, i in work:
        image = devkit / f"VOC{y}" / "JPEGImages" / f"{i}.jpg"
        if jpeg_end_state(image) == "truncated":
            raise AtcacheError(f"image {image} is a truncated or corrupt JPEG (no FFD9 end marker), which ultralytics "
                               "drops from training; restore it from the VOC archive or remove its id from the ImageSets list")


def prepare_voc(devkit: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Convert every VOC year/set present under `devkit` into `out`; returns the data YAML written there."""
    from tqdm import tqdm

    devkit, out = _find_devkit(devkit), Path(out).resolve()
    work, listings = [], []
    for year, image_set in VOC_SETS:
        listing = devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt"
        if listing.is_file():
            listings.append(listing)
            work += [(year, image_set, i) for i in listing.read_text().split()]
    if not listings:
        raise AtcacheError(f"{devkit} has no ImageSets/Main/{{train,val,test}}.txt lists; is it a VOCdevkit?")
    if not any(s in ("train", "val") for _, s, _ in work):
        lists = [str(p.relative_to(devkit)) for p in listings if p.stem in ("train", "val")]
        why = f"{', '.join(lists)} {'is' if len(lists) == 1 else 'are'} empty" if lists else "no train/val lists"
        raise AtcacheError(f"{devkit} lists no training images ({why}); list the image ids, one per line, in "
                           "VOC<year>/ImageSets/Main/train.txt or val.txt")
    _check_listed_files(devkit, work)
    for year, image_set in VOC_SETS:
        (out / "images" / f"{image_set}{year}").mkdir(parents=True, exist_ok=True)
        (out / "labels" / f"{image_set}{year}").mkdir(parents=True, exist_ok=True)
    for year, image_set, image_id in tqdm(work, desc="prepare-voc", unit="img", disable=not progress):
        voc = devkit / f"VOC{year}"
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        lines = _convert_annotation(voc / "Annotations" / f"{image_id}.xml")
        _link_or_copy(image, out / "images" / f"{image_set}{year}" / image.name)
        label = out / "labels" / f"{image_set}{year}" / f"{image_id}.txt"
        text = "".join(line + "\n" for line in lines)
        if not label.exists() or label.read_text() != text:
            label.write_text(text)
    present = {f"{s}{y}" for y, s in {(y, s) for y, s, _ in work}}
    train = [d for d in TRAIN_DIRS if d.split("/")[1] in present]
    val = [d for d in VAL_DIRS if d.split("/")[1] in present] or train[-1:]
    data = {"path": str(out), "train": train, "val": val, "test": list(val), "names": dict(enumerate(VOC_NAMES))}
    data_yaml = out / "VOC.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml
