"""A deterministic synthetic dataset written in real VOCdevkit format (XML annotations, ImageSets, JPEGImages).

VOC cannot be downloaded on build/CI machines, so the real VOC path (prepare-voc on a VOCdevkit) is tested on this.
Each of the 20 VOC classes is a shape (5 kinds) in a colour family and texture (4 kinds), drawn at varied scale and
aspect over a textured background; later objects occlude earlier ones; boxes cut by the border are `truncated`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from atcache.data.voc import VOC_NAMES
from atcache.settings import DemoDataConfig

# (year, image_set, share of all images): the proportions of VOC 2007+2012.
SPLITS = (("2012", "train", 0.27), ("2012", "val", 0.27), ("2007", "train", 0.12), ("2007", "val", 0.12), ("2007", "test", 0.22))
SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots")


@dataclass(frozen=True)
class SyntheticObject:
    cls: int
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (VOC 1-based, inclusive)
    truncated: bool
    difficult: bool


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    low = rng.integers(40, 215, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 12, size=(h, w, 3))
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 7))):  # clutter lines
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p1, p2, tuple(int(c) for c in rng.integers(0, 255, 3)), int(rng.integers(1, 4)))
    return img


def _class_colour(cls: int, rng: np.random.Generator) -> tuple[int, int, int]:
    hue = (cls * 9 + int(rng.integers(-2, 3))) % 180  # OpenCV hue range 0..179
    hsv = np.uint8([[[hue, int(rng.integers(170, 256)), int(rng.integers(150, 256))]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if shape == "rectangle":
        m[:] = 1
    elif shape == "ellipse":
        cv2.ellipse(m, (w // 2, h // 2), (max(w // 2, 1), max(h // 2, 1)), 0, 0, 360, 1, -1)
    elif shape == "triangle":
        cv2.fillPoly(m, [np.array([[w // 2, 0], [0, h - 1], [w - 1, h - 1]], np.int32)], 1)
    elif shape == "diamond":
        cv2.fillPoly(m, [np.array([[w // 2, 0], [w - 1, h // 2], [w // 2, h - 1], [0, h // 2]], np.int32)], 1)
    else:  # cross
        tw, th = max(w // 3, 1), max(h // 3, 1)
        m[:, (w - tw) // 2:(w + tw) // 2 + 1] = 1
        m[(h - th) // 2:(h + th) // 2 + 1, :] = 1
    return m


def _texture(texture: str, w: int, h: int, colour, rng: np.random.Generator) -> np.ndarray:
    base = np.empty((h, w, 3), np.uint8)
    base[:] = colour
    dark = tuple(int(c * 0.35) for c in colour)
    period = int(rng.integers(4, 9))
    yy, xx = np.mgrid[0:h, 0:w]
    if texture == "stripes":
        base[(xx // period) % 2 == 0] = dark
    elif texture == "checker":
        base[((xx // period) + (yy // period)) % 2 == 0] = dark
    elif texture == "dots":
        base[((xx % period) < period // 2) & ((yy % period) < period // 2)] = dark
    return base


def _draw_image(rng: np.random.Generator, w: int, h: int, max_objects: int = 6) -> tuple[np.ndarray, list[SyntheticObject]]:
    """One BGR image and its objects (boxes in VOC convention)."""
    img = _background(rng, h, w)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(VOC_NAMES)))
        area = rng.uniform(0.01, 0.30) * w * h
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        ow, oh = max(4, int(np.sqrt(area * aspect))), max(4, int(np.sqrt(area / aspect)))
        x0 = int(rng.integers(-ow // 4, w - 3 * ow // 4 + 1))
        y0 = int(rng.integers(-oh // 4, h - 3 * oh // 4 + 1))
        mask = _shape_mask(SHAPES[cls % len(SHAPES)], ow, oh)
        tex = _texture(TEXTURES[cls // len(SHAPES)], ow, oh, _class_colour(cls, rng), rng)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + ow, w), min(y0 + oh, h)
        if xb - xa < 3 or yb - ya < 3:
            continue
        sub = mask[ya - y0:yb - y0, xa - x0:xb - x0].astype(bool)
        region = img[ya:yb, xa:xb]
        region[sub] = tex[ya - y0:yb - y0, xa - x0:xb - x0][sub]
        ys, xs = np.nonzero(sub)
        if len(xs) == 0:
            continue
        box = (xa + int(xs.min()) + 1, ya + int(ys.min()) + 1, xa + int(xs.max()) + 1, ya + int(ys.max()) + 1)
        truncated = x0 < 0 or y0 < 0 or x0 + ow > w or y0 + oh > h
        small = (box[2] - box[0]) * (box[3] - box[1]) < 0.004 * w * h
        objects.append(SyntheticObject(cls, box, truncated, bool(small or rng.random() < 0.03)))
    return img, objects


def _annotation_xml(folder: str, filename: str, w: int, h: int, objects: list[SyntheticObject]) -> ET.ElementTree:
    """A VOC annotation with the same elements as the real devkit's."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "atcache synthetic VOC"
    ET.SubElement(source, "annotation").text = "atcache make-demo-data"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = VOC_NAMES[o.cls]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o.box):
            ET.SubElement(bb, tag).text = str(v)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def make_demo_data(out: str | Path, images: int = DemoDataConfig.images, size: int = DemoDataConfig.size,
                   seed: int = DemoDataConfig.seed, progress: bool = True) -> Path:
    """Write `images` images into OUT/VOCdevkit/VOC{2007,2012} and return the VOCdevkit path.

    Image sides vary around `size` (long side in [0.75, 1.0] x size, aspect 0.6..1.6) like VOC's ~500x375 photos.
    Deterministic: the same arguments always write the same bytes."""
    from tqdm import tqdm

    devkit = Path(out) / "VOCdevkit"
    counts = [max(1, round(images * share)) for *_, share in SPLITS]
    counts[0] += images - sum(counts)
    sets: dict[tuple[str, str], list[str]] = {}
    index = {"2007": 0, "2012": 0}
    bar = tqdm(total=images, desc="make-demo-data", unit="img", disable=not progress)
    for (year, image_set, _), n in zip(SPLITS, counts):
        voc = devkit / f"VOC{year}"
        for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
            (voc / sub).mkdir(parents=True, exist_ok=True)
        ids = []
        for _ in range(n):
            index[year] += 1
            image_id = f"{index[year]:06d}" if year == "2007" else f"2012_{index[year]:06d}"
            rng = np.random.default_rng([seed, int(year), index[year]])
            long = int(size * rng.uniform(0.75, 1.0))
            aspect = rng.uniform(0.6, 1.6)
            w, h = (long, max(16, int(long / aspect))) if aspect >= 1 else (max(16, int(long * aspect)), long)
            img, objects = _draw_image(rng, w, h)
            cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            _annotation_xml(f"VOC{year}", f"{image_id}.jpg", w, h, objects).write(
                voc / "Annotations" / f"{image_id}.xml", encoding="unicode"
            )
            ids.append(image_id)
            bar.update(1)
        sets[(year, image_set)] = ids
    bar.close()
    for year in ("2007", "2012"):
        main = devkit / f"VOC{year}" / "ImageSets" / "Main"
        for image_set in ("train", "val", "test"):
            if (year, image_set) in sets:
                (main / f"{image_set}.txt").write_text("\n".join(sets[(year, image_set)]) + "\n")
        trainval = sets.get((year, "train"), []) + sets.get((year, "val"), [])
        (main / "trainval.txt").write_text("\n".join(trainval) + "\n")
    return devkit
