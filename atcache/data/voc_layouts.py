"""Which kind of input `atcache prepare-voc` was given, and its (image, annotation, split) items: layout discovery only
(atcache.data.voc converts what is found here into ultralytics' layout; this module imports nothing of it).

A VOCdevkit (VOC2007/, VOC2012/): its ImageSets lists define the dataset (unlisted annotations are ignored, a listed id
without its image or XML is an error). A folder an annotation tool exported (images/ or JPEGImages/ beside Annotations/,
or both in one folder): split by its ImageSets/Main/{train,val,test}.txt where present, else seeded by --val-fraction;
its images without XML are background images. Split folders as Roboflow exports them (train/, valid/ or val/, and
optionally test/, each a folder of the kind above; other files, such as README.roboflow.txt, are ignored): the folders
are the split. Every XML is parsed here, as matching it to its image may need its <filename>."""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

from atcache.errors import AtcacheError, first_line

VOC_SETS = (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test"))
TRAIN_DIRS = ("images/train2012", "images/train2007", "images/val2012", "images/val2007")
VAL_DIRS = ("images/test2007",)
EXPORT_SPLITS = ("train", "val", "test")  # ImageSets/Main lists of an exported folder, and its output folders
SPLIT_FOLDERS = {"train": "train", "valid": "val", "val": "val", "test": "test"}  # split folder -> output split


# an XML's object (box: xmin, xmax, ymin, ymax as written); an XML (filename: <filename>'s last path component, size:
# <size> (w, h) or None where missing or zero); an output image (ann None: background; split: images/<split>; stem: its
# label file's name, the listed id for a VOCdevkit); what a conversion writes, checked before anything is (dirs: the
# data YAML's train/val/test; folders: every split folder of the layout, written or emptied of an earlier run's files)
_Object = NamedTuple("_Object", [("name", str), ("box", tuple), ("difficult", bool)])
_Annotation = NamedTuple("_Annotation", [("xml", Path), ("filename", Optional[str]), ("size", Optional[tuple]),
                                         ("objects", list)])
Item = NamedTuple("Item", [("image", Path), ("ann", Optional[_Annotation]), ("split", str), ("stem", str)])
Plan = NamedTuple("Plan", [("items", list), ("yaml_name", str), ("folders", tuple), ("dirs", dict),
                           ("split_note", str), ("devkit", bool), ("unlisted", int)])


def _parse_xml(xml: Path, fix: str) -> _Annotation:
    """One Pascal VOC annotation; AtcacheError naming the file if it is not one."""
    def number(node, tag: str, what: str = "") -> float:  # without `what`: optional, 0 where missing
        text = (node.findtext(tag) or "").strip() if node is not None else ""
        if not text and what:
            raise ValueError(f"{what} has no <{tag}>")
        return float(text or 0)

    try:
        root = ET.parse(xml).getroot()
        if root.tag != "annotation":
            raise AtcacheError(f"{xml} is not a Pascal VOC annotation (its root is <{root.tag}>, not <annotation>); "
                               f"{fix} (or export the annotations in Pascal VOC format)")
        w, h = (number(root.find("size"), tag) for tag in ("width", "height"))
        objects = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if not name or obj.find("bndbox") is None:
                raise ValueError(f"an <object> without a <{'bndbox' if name else 'name'}>")
            box = tuple(number(obj.find("bndbox"), t, f"object {name!r}") for t in ("xmin", "xmax", "ymin", "ymax"))
            objects.append(_Object(name, box, (obj.findtext("difficult") or "").strip().lower() in ("1", "true")))
    except (ET.ParseError, UnicodeDecodeError, ValueError) as e:
        raise AtcacheError(f"annotation {xml} is malformed ({first_line(e)}); {fix}") from None
    filename = (root.findtext("filename") or "").strip().replace("\\", "/").rsplit("/", 1)[-1] or None
    return _Annotation(xml, filename, (w, h) if w > 0 and h > 0 else None, objects)


def _images_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Files of `folder` in a format ultralytics reads (any case of the suffix), by stem."""
    from atcache.yolo import IMG_FORMATS

    out: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name) if folder.is_dir() else ():
        if "." in entry.name and entry.name.rpartition(".")[2].lower() in IMG_FORMATS and entry.is_file():
            out.setdefault(Path(entry.path).stem, []).append(Path(entry.path))
    return out


def find_devkit(devkit: str | Path) -> Path | None:
    """PATH/VOCdevkit, or its parent, as long as VOC2007 or VOC2012 is inside; None otherwise."""
    p = Path(devkit)
    return next((c for c in (p, p / "VOCdevkit", p / "images" / "VOCdevkit")
                 if (c / "VOC2007").is_dir() or (c / "VOC2012").is_dir()), None)


def and_more(items: list, what: str = "") -> str:
    """An error's tail counting the items after its first: " (and 2 more<what>)"."""
    return f" (and {len(items) - 1} more{what})" if len(items) > 1 else ""


def devkit_plan(devkit: Path) -> Plan:
    """The listed ids of every VOC year/set present; every one has its image and XML (else one error naming the first
    missing file)."""
    listings = [(y, s, devkit / f"VOC{y}" / "ImageSets" / "Main" / f"{s}.txt") for y, s in VOC_SETS]
    listings = [(y, s, p) for y, s, p in listings if p.is_file()]
    work = [(y, s, i) for y, s, p in listings for i in p.read_text().split()]
    if not listings:
        raise AtcacheError(f"{devkit} has no ImageSets/Main/{{train,val,test}}.txt lists; is it a VOCdevkit?")
    if not any(s in ("train", "val") for _, s, _ in work):
        lists = [str(p.relative_to(devkit)) for _, s, p in listings if s in ("train", "val")]
        why = f"{', '.join(lists)} {'is' if len(lists) == 1 else 'are'} empty" if lists else "no train/val lists"
        raise AtcacheError(f"{devkit} lists no training images ({why}); list the image ids, one per line, in "
                           "VOC<year>/ImageSets/Main/train.txt or val.txt")
    images = {y: _images_by_stem(devkit / f"VOC{y}" / "JPEGImages") for y in {y for y, _, _ in work}}
    missing, found = [], []
    for year, image_set, i in work:
        xml, candidates = devkit / f"VOC{year}" / "Annotations" / f"{i}.xml", images[year].get(i, [])
        missing += [(p, image_set) for p, ok in ((devkit / f"VOC{year}" / "JPEGImages" / f"{i}.jpg", candidates),
                                                 (xml, xml.is_file())) if not ok]
        if len(candidates) > 1:
            raise AtcacheError(f"id {i} of VOC{year}/ImageSets/Main/{image_set}.txt has {len(candidates)} images "
                               f"({', '.join(p.name for p in candidates)}); keep one")
        found.append((year, image_set, i, candidates[:1], xml))
    if missing:
        path, image_set = missing[0]
        raise AtcacheError(f"{'annotation' if path.suffix == '.xml' else 'image'} {path} is listed in ImageSets/Main/"
                           f"{image_set}.txt but missing{and_more(missing)}; restore it or remove the id from the list")
    fix = "fix it or remove its id from the ImageSets list"
    items = [Item(image[0], _parse_xml(xml, fix), f"{s}{y}", i) for y, s, i, image, xml in found]
    present = {f"{s}{y}" for y, s, _ in work}
    train = [d for d in TRAIN_DIRS if d.split("/")[1] in present]
    val = [d for d in VAL_DIRS if d.split("/")[1] in present] or train[-1:]
    return Plan(items, "VOC.yaml", tuple(f"{s}{y}" for y, s in VOC_SETS),
                {"train": train, "val": val, "test": list(val)}, "VOCdevkit ImageSets lists", True, 0)


def _export_items(root: Path, split: str = "") -> list[Item]:
    """Every XML of an exported folder (of one split folder: `split`) matched to its image (by the XML's name, else its
    <filename>), then the other images as background images; one error for an XML without an image, or two images
    with one label file."""
    xml_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    image_dir = next((d for d in (root / "JPEGImages", root / "images") if d.is_dir()), root)
    xmls = sorted(p for p in xml_dir.iterdir() if p.suffix.lower() == ".xml" and p.is_file()) if xml_dir.is_dir() else []
    if not xmls and not split:  # split folders: checked over all of them by _split_items
        what = "holds" if root.is_dir() else "is not a folder:" if root.exists() else "does not exist:"
        raise AtcacheError(f"{root} {what} no VOC2007/ or VOC2012/ folder and no Pascal VOC XML (Annotations/*.xml or "
                           "*.xml); pass a VOCdevkit, or a folder of images and XML as an annotation tool exports it")
    images = _images_by_stem(image_dir)
    by_name = {p.name: p for paths in images.values() for p in paths}
    items: dict[Path, Item] = {}
    orphans = []
    for xml in xmls:
        ann = _parse_xml(xml, "fix or remove it")
        candidates = images.get(xml.stem, [])
        image = candidates[0] if len(candidates) == 1 else by_name.get(ann.filename or "")
        if image is None and len(candidates) > 1:
            raise AtcacheError(f"annotation {xml} matches images {', '.join(p.name for p in candidates)} and its "
                               "<filename> names none of them; keep one image or correct <filename>")
        if image in items:
            raise AtcacheError(f"annotations {items[image].ann.xml.name} and {xml.name} are both of image {image}; "
                               "remove one of them")
        if image is None:
            orphans.append(xml)
        else:
            items[image] = Item(image, ann, split, image.stem)
    if orphans:
        raise AtcacheError(f"annotation {orphans[0]} has no image in {image_dir} (looked for {orphans[0].stem}.<image "
                           f"format> and its <filename>){and_more(orphans, ' XML without an image')}; restore the "
                           "image or remove the XML")
    for p in by_name.values():
        items.setdefault(p, Item(p, None, split, p.stem))
    twice = sorted(s for s, c in Counter(item.stem for item in items.values()).items() if c > 1)
    if twice:
        raise AtcacheError(f"images {', '.join(sorted(p.name for p in items if p.stem == twice[0]))} share the name "
                           f"{twice[0]!r}, and ultralytics reads one label file ({twice[0]}.txt) for both; rename one")
    return sorted(items.values(), key=lambda it: it.image.name)


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders (train/, valid/ or val/, test/) of a folder holding no XML itself, by name; {} for any other
    input, one error for split folders that do not make a training and a validation split."""
    if not root.is_dir() or (root / "Annotations").is_dir() or any(p.suffix.lower() == ".xml" for p in root.iterdir()):
        return {}
    found = {name: root / name for name in SPLIT_FOLDERS if (root / name).is_dir()}
    if "valid" in found and "val" in found:
        raise AtcacheError(f"{root} holds both valid/ and val/ split folders; merge them into one")
    if found and "train" not in found:
        raise AtcacheError(f"{root} holds the split folders {', '.join(f'{n}/' for n in found)} but no train/; add a "
                           "train/ folder of training images and their XML")
    if list(found) == ["train"]:
        raise AtcacheError(f"{root} holds a train/ split folder but no valid/ (or val/); add a valid/ folder of "
                           f"validation images and their XML, or pass --devkit {root / 'train'} for a seeded split "
                           "(--val-fraction, --seed)")
    return found


def _split_items(root: Path, folders: dict[str, Path]) -> list[Item]:
    """The items of every split folder, each in its split; one error for a split folder without images, or no XML."""
    items = []
    for name, folder in folders.items():
        found = _export_items(folder, SPLIT_FOLDERS[name])
        if not found:
            raise AtcacheError(f"split folder {folder} holds no images; add its images and XML, or remove the folder")
        items += found
    if not any(item.ann for item in items):
        raise AtcacheError(f"{root}'s split folders {', '.join(f'{n}/' for n in folders)} hold no Pascal VOC XML "
                           "(*.xml or Annotations/*.xml); export the annotations in Pascal VOC format")
    return items


def export_plan(root: Path, val_fraction: float, seed: int) -> Plan:
    """An exported folder split by its split folders (train/, valid/ or val/, test/), else by its
    ImageSets/Main/{train,val,test}.txt, else seeded: the images whose hash of seed and name is lowest validate (an
    image's side does not depend on the others: adding images moves few)."""
    folders = _split_folders(root)
    items = _split_items(root, folders) if folders else _export_items(root)
    main = root / "ImageSets" / "Main"
    ids = {s: (main / f"{s}.txt").read_text().split() for s in EXPORT_SPLITS if (main / f"{s}.txt").is_file()}
    if folders:
        chosen, splits = items, [s for s in EXPORT_SPLITS if any(item.split == s for item in items)]
        note = "split by the folders " + ", ".join(f"{n}/" for n in folders)
    elif ids:
        if not ids.get("train") or not (ids.get("val") or ids.get("test")):
            what = ("training images (no or an empty train.txt)" if not ids.get("train") else
                    "validation images (no or an empty val.txt or test.txt)")
            raise AtcacheError(f"{main} lists no {what}; list their ids there, or remove ImageSets/ to split by "
                               "--val-fraction")
        by_id = {}
        for item in items:
            by_id.setdefault(item.stem, item)
            by_id.setdefault(item.ann.xml.stem if item.ann else item.stem, item)
        chosen = []
        for s, listed in ids.items():
            absent = [i for i in listed if i not in by_id]
            if absent:
                raise AtcacheError(f"id {absent[0]} is listed in ImageSets/Main/{s}.txt but has no image or XML in "
                                   f"{root}{and_more(absent)}; restore it or remove the id from the list")
            chosen += [by_id[i]._replace(split=s) for i in listed]
        twice = [it for it, c in Counter(it.image for it in chosen).items() if c > 1]
        if twice:
            raise AtcacheError(f"image {twice[0].name} is listed more than once in ImageSets/Main/"
                               f"{{{','.join(ids)}}}.txt; list each id once")
        splits = [s for s in EXPORT_SPLITS if ids.get(s)]
        note = "split by ImageSets/Main/" + ", ".join(f"{s}.txt" for s in splits)
    else:
        n = len(items)
        n_val = 0 if val_fraction == 0 or n < 2 else min(max(1, round(n * val_fraction)), n - 1)
        rank = lambda it: hashlib.sha256(f"{seed}/{it.image.name}".encode()).hexdigest()  # noqa: E731
        val = {it.image for it in sorted(items, key=rank)[:n_val]}
        chosen = [it._replace(split="val" if it.image in val else "train") for it in items]
        splits = ["train", "val"] if n_val else ["train"]
        note = f"seeded split: --val-fraction {val_fraction} --seed {seed}"
        note += "" if n_val else "; no validation images: validates on train"
    val = "images/val" if "val" in splits else "images/test" if "test" in splits else "images/train"
    dirs = {"train": "images/train", "val": val, "test": "images/test" if "test" in splits else val}
    return Plan(chosen, "data.yaml", EXPORT_SPLITS, dirs, note, False, len(items) - len(chosen))


