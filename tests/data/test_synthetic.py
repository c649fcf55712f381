import hashlib
import xml.etree.ElementTree as ET

import cv2

from atcache import VOC_NAMES
from atcache.data.synthetic import make_demo_data


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path):
    a = make_demo_data(tmp_path / "a", images=12, size=64, seed=3, progress=False)
    b = make_demo_data(tmp_path / "b", images=12, size=64, seed=3, progress=False)
    c = make_demo_data(tmp_path / "c", images=12, size=64, seed=4, progress=False)
    assert _digest(a) == _digest(b) != _digest(c)


def test_voc_schema_and_boxes_inside_images(voc_devkit):
    n_objects, classes = 0, set()
    for xml in voc_devkit.rglob("Annotations/*.xml"):
        ann = ET.parse(xml).getroot()
        w, h = int(ann.find("size/width").text), int(ann.find("size/height").text)
        img = cv2.imread(str(xml.parent.parent / "JPEGImages" / ann.find("filename").text))
        assert img.shape[:2] == (h, w) and ann.find("size/depth").text == "3"
        for obj in ann.iter("object"):
            name = obj.find("name").text
            assert name in VOC_NAMES and obj.find("difficult").text in "01" and obj.find("truncated").text in "01"
            x0, y0, x1, y1 = (int(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 < x1 <= w and 1 <= y0 < y1 <= h
            n_objects += 1
            classes.add(name)
    assert n_objects > 40 and len(classes) >= 15


def test_imagesets_cover_voc_sets(voc_devkit):
    for year, sets in (("2007", ("train", "val", "test", "trainval")), ("2012", ("train", "val", "trainval"))):
        for s in sets:
            ids = (voc_devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{s}.txt").read_text().split()
            assert ids and all((voc_devkit / f"VOC{year}" / "JPEGImages" / f"{i}.jpg").is_file() for i in ids)
