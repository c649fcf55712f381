import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from atcache import VOC_NAMES
from atcache.errors import AtcacheError
from atcache.data.voc import prepare_voc, voc_box_to_yolo
from helpers import assert_one_line_error, invoke


def test_layout_matches_ultralytics_voc_yaml(voc_yaml):
    data = yaml.safe_load(voc_yaml.read_text())
    assert data["train"] == ["images/train2012", "images/train2007", "images/val2012", "images/val2007"]
    assert data["val"] == ["images/test2007"]
    assert list(data["names"].values()) == list(VOC_NAMES)
    root = voc_yaml.parent
    for d in data["train"] + data["val"]:
        images = sorted((root / d).glob("*.jpg"))
        assert images
        for im in images:
            assert (root / d.replace("images", "labels") / (im.stem + ".txt")).is_file()


def test_labels_follow_ultralytics_conversion(voc_devkit, voc_yaml):
    root = voc_yaml.parent
    checked = 0
    for xml in sorted((voc_devkit / "VOC2007" / "Annotations").glob("*.xml"))[:10]:
        ann = ET.parse(xml).getroot()
        w, h = int(ann.find("size/width").text), int(ann.find("size/height").text)
        expected = []
        for obj in ann.iter("object"):
            if obj.find("difficult").text == "1":
                continue
            bb = [float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "xmax", "ymin", "ymax")]
            x, y = (bb[0] + bb[1]) / 2 - 1, (bb[2] + bb[3]) / 2 - 1
            expected.append([VOC_NAMES.index(obj.find("name").text), x / w, y / h, (bb[1] - bb[0]) / w, (bb[3] - bb[2]) / h])
        label = next(root.glob(f"labels/*2007/{xml.stem}.txt"))
        got = [[float(v) for v in line.split()] for line in label.read_text().splitlines()]
        assert len(got) == len(expected)
        assert sum(got, []) == pytest.approx(sum(expected, []))
        checked += 1
    assert checked == 10


def test_box_conversion_hand_computed():
    assert voc_box_to_yolo(100, 50, 11, 31, 6, 26) == pytest.approx((0.2, 0.3, 0.2, 0.4))


def test_idempotent(voc_devkit, tmp_path):
    out = tmp_path / "VOC"
    y1 = prepare_voc(voc_devkit, out, progress=False)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    y2 = prepare_voc(voc_devkit, out, progress=False)
    assert y1 == y2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_malformed_xml_names_the_file(voc_devkit, tmp_path):
    import shutil

    kit = tmp_path / "VOCdevkit"
    shutil.copytree(voc_devkit, kit)
    victim = sorted((kit / "VOC2012" / "Annotations").glob("*.xml"))[0]
    victim.write_text("<annotation><size><width>10</width>")
    with pytest.raises(AtcacheError, match=victim.name):
        prepare_voc(kit, tmp_path / "out", progress=False)


def test_missing_image_names_the_file(voc_devkit, tmp_path):
    import shutil

    kit = tmp_path / "VOCdevkit"
    shutil.copytree(voc_devkit, kit)
    victim = sorted((kit / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(AtcacheError, match=f"{victim.name}.*missing"):
        prepare_voc(kit, tmp_path / "out", progress=False)


def test_not_a_devkit(tmp_path):
    with pytest.raises(AtcacheError, match="no VOC2007"):
        prepare_voc(tmp_path, tmp_path / "out", progress=False)


def test_shipped_voc_yaml_matches_the_generated_one(voc_yaml):
    from pathlib import Path

    shipped = yaml.safe_load((Path(__file__).parents[2] / "data" / "VOC.yaml").read_text())
    generated = yaml.safe_load(voc_yaml.read_text())
    for key in ("train", "val", "test", "names"):
        assert shipped[key] == generated[key], key


# ------------------------------------------------- a folder exported by an annotation tool (images + Pascal VOC XML)
def _write_xml(path, filename, size, objects):
    """A Pascal VOC annotation as LabelImg/CVAT write it; objects: (name, (xmin, ymin, xmax, ymax), difficult)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    if size is not None:
        s = ET.SubElement(root, "size")
        for tag, v in zip(("width", "height", "depth"), (*size, 3)):
            ET.SubElement(s, tag).text = str(v)
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, tag).text = str(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)


def _write_image(path, w, h, seed=0):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")


# (image name, (w, h), objects): PNG and JPEG, upper- and lower-case suffixes, one image without XML
EXPORT = [
    ("a01.png", (48, 32), [("Tree", (3, 4, 20, 30), False), ("Bush", (25, 10, 40, 20), False)]),
    ("a02.PNG", (32, 48), [("Tree", (1, 1, 32, 48), False)]),
    ("a03.jpg", (64, 40), [("Bush", (10, 5, 30, 25), False), ("Bush", (35, 8, 60, 38), False),
                           ("Tree", (2, 2, 9, 9), False)]),
    ("a04.Png", (40, 40), [("Tree", (5, 5, 15, 35), False)]),
    ("a05.jpg", (56, 32), [("Bush", (12.5, 3.5, 40.5, 28), False)]),
    ("a06.png", (32, 32), [("Tree", (4, 4, 28, 28), False), ("Tree", (10, 12, 20, 30), False)]),
    ("a07.JPG", (48, 48), [("Bush", (1, 20, 22, 48), False)]),
    ("a08.png", (36, 44), [("Tree", (6, 6, 30, 40), False)]),
    ("a09.png", (44, 36), [("Bush", (2, 3, 40, 30), False), ("Tree", (20, 4, 42, 20), False)]),
    ("a10.jpg", (32, 32), None),
]


def _export(root, items=EXPORT, images="images", annotations="Annotations"):
    for i, (name, size, objects) in enumerate(items):
        _write_image(root / images / name, *size, seed=i)
        if objects is not None:
            _write_xml(root / annotations / f"{Path(name).stem}.xml", name, size, objects)
    return root


def _labels(root) -> dict[str, list[list[float]]]:
    """Image stem -> label rows, over every split."""
    return {p.stem: [[float(v) for v in line.split()] for line in p.read_text().splitlines()]
            for p in root.glob("labels/*/*.txt")}


def _assert_labels(got, expected) -> None:
    assert got.keys() == expected.keys()
    for stem in expected:
        assert sum(got[stem], []) == pytest.approx(sum(expected[stem], [])), stem


def _expected(items, ids, keep=lambda obj: not obj[2]) -> dict[str, list[list[float]]]:
    out = {}
    for name, (w, h), objects in items:
        out[Path(name).stem] = [[ids[n], *voc_box_to_yolo(w, h, b[0], b[2], b[1], b[3])]
                                for n, b, d in objects or () if keep((n, b, d))]
    return out


def test_export_png_custom_classes_seeded_split(tmp_path):
    src, out = _export(tmp_path / "trees"), tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--val-fraction", 0.3)
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: "Bush", 1: "Tree"} and data["train"] == "images/train" and data["val"] == "images/val"
    train, val = sorted((out / "images" / "train").iterdir()), sorted((out / "images" / "val").iterdir())
    assert (len(train), len(val)) == (7, 3)
    assert {p.name for p in train + val} == {name for name, _, _ in EXPORT}  # suffixes kept as written (.PNG, .JPG)
    for image in train + val:
        assert (out / "labels" / image.parent.name / f"{image.stem}.txt").is_file()
    got, expected = _labels(out), _expected(EXPORT, {"Bush": 0, "Tree": 1})
    n_objects = sum(len(o or ()) for _, _, o in EXPORT)
    assert sum(len(rows) for rows in got.values()) == n_objects == 14
    assert got["a10"] == []  # the image without XML: a background image
    _assert_labels(got, expected)
    assert "images: 10 (train 7, val 3; seeded split: --val-fraction 0.3 --seed 0)" in result.output
    assert "label lines per class: 0 Bush: 6, 1 Tree: 8" in result.output
    assert "objects: 14 in the XML = 14 label lines + 0 difficult" in result.output
    assert "images without objects: 1 (1 without XML, kept as background images)" in result.output
    assert result.output.rstrip().splitlines()[-1] == f"dataset ready: {out.resolve() / 'data.yaml'}"

    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert invoke("prepare-voc", "--devkit", src, "--out", out, "--val-fraction", 0.3).exit_code == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # same inputs, same split
    assert invoke("prepare-voc", "--devkit", src, "--out", out, "--val-fraction", 0.3, "--seed", 1).exit_code == 0
    assert len(list(out.glob("images/*/*"))) == 10 and len(list(out.glob("labels/*/*.txt"))) == 10  # no stale copies
    assert len(list((out / "images" / "val").iterdir())) == 3


def test_export_classes_option_fixes_the_order(tmp_path):
    src = _export(tmp_path / "trees")
    for order in ("Bush,Tree", "Tree,Bush"):
        out = tmp_path / order
        assert invoke("prepare-voc", "--devkit", src, "--out", out, "--classes", order).exit_code == 0
        ids = {n: i for i, n in enumerate(order.split(","))}
        assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {i: n for n, i in ids.items()}
        _assert_labels(_labels(out), _expected(EXPORT, ids))


def test_export_class_outside_classes_stops_before_writing(tmp_path):
    items = EXPORT[:3] + [("b01.png", (40, 40), [("Rock", (2, 2, 10, 10), False), ("Tree", (1, 1, 9, 9), False)]),
                          ("b02.png", (40, 40), [("Rock", (5, 5, 30, 30), False)])]
    src, out = _export(tmp_path / "trees", items), tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--classes", "Tree,Bush")
    assert_one_line_error(result, "'Rock'", "2 objects", "b01.xml", "--classes", "--skip-classes Rock")
    assert not out.exists()
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--classes", "Tree,Bush", "--skip-classes", "Rock")
    assert result.exit_code == 0, result.output
    assert "skipped classes (--skip-classes): Rock 2" in result.output
    assert "objects: 9 in the XML = 7 label lines + 0 difficult dropped + 2 of skipped classes" in result.output
    assert _labels(out)["b02"] == [] and len(_labels(out)["b01"]) == 1
    result = invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "out2", "--skip-classes", "Rock")
    assert result.exit_code == 0 and "0 Bush: 3, 1 Tree: 4" in result.output  # no --classes: the others, sorted


def test_export_names_keep_their_case(tmp_path):
    items = [("c01.png", (32, 32), [("Tree", (1, 1, 10, 10), False), (" tree ", (5, 5, 20, 20), False)])]
    out = tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", _export(tmp_path / "src", items), "--out", out)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "Tree", 1: "tree"}  # stripped, not merged
    assert "Tree, tree differ only in case" in result.output
    result = invoke("prepare-voc", "--devkit", tmp_path / "src", "--out", tmp_path / "o2", "--classes", "Tree")
    assert_one_line_error(result, "'tree'", "case-sensitive")


def test_export_difficult_dropped_or_kept(tmp_path):
    items = [("d01.png", (40, 40), [("Tree", (2, 2, 20, 20), True), ("Tree", (5, 5, 30, 30), False)]),
             ("d02.png", (40, 40), [("Bush", (2, 2, 20, 20), True)]),
             ("d03.png", (40, 40), [("Bush", (2, 2, 38, 38), False)])]
    src = _export(tmp_path / "src", items)
    result = invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "drop")
    assert result.exit_code == 0, result.output
    assert "objects: 4 in the XML = 2 label lines + 2 difficult dropped" in result.output
    assert "difficult: 2 dropped (add --keep-difficult to keep them)" in result.output
    assert "images without objects: 1" in result.output
    _assert_labels(_labels(tmp_path / "drop"), _expected(items, {"Bush": 0, "Tree": 1}))
    result = invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "keep", "--keep-difficult")
    assert result.exit_code == 0 and "difficult: 2 kept (--keep-difficult)" in result.output
    assert sum(len(v) for v in _labels(tmp_path / "keep").values()) == 4


def test_export_boxes_clipped_degenerate_dropped_and_counted(tmp_path):
    items = [("e01.png", (40, 20), [("Tree", (-5, 2, 30, 25), False),   # outside: clipped
                                    ("Tree", (30, 5, 30, 15), False),   # zero width: dropped
                                    ("Tree", (45, 5, 60, 15), False),   # right of the image: nothing left
                                    ("Tree", (0, 0, 40, 20), False)])]  # 0-based full image: -1 offset, clipped
    out = tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", _export(tmp_path / "src", items), "--out", out)
    assert result.exit_code == 0, result.output
    assert "objects: 4 in the XML = 2 label lines + 0 difficult dropped + 0 of skipped classes + 2 degenerate" in result.output
    assert "degenerate boxes: 2 dropped (no width or height left inside the image); 2 boxes clipped" in result.output
    rows = _labels(out)["e01"]
    assert len(rows) == 2 and all(0 <= v <= 1 for row in rows for v in row[1:])
    assert rows[0][1:] == pytest.approx([14.5 / 40, 0.5 * (1 / 20 + 1), 29 / 40, 1 - 1 / 20])  # x -6..29, y 1..24


def test_export_size_mismatch_and_missing_size(tmp_path):
    items = [("f01.png", (40, 30), [("Tree", (2, 2, 20, 20), False)])]
    src = _export(tmp_path / "src", items)
    _write_xml(src / "Annotations" / "f01.xml", "f01.png", (30, 40), items[0][2])
    result = invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "out")
    assert_one_line_error(result, "f01.xml", "<size> 30x40", "is 40x30", "correct <size>")
    assert not (tmp_path / "out").exists()
    _write_xml(src / "Annotations" / "f01.xml", "f01.png", (0, 0), items[0][2])  # zero <size>: the image's
    assert invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "out").exit_code == 0
    _assert_labels(_labels(tmp_path / "out"), _expected(items, {"Tree": 0}))


def test_export_exif_rotated_jpeg(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[274] = 6  # rotate 90: ultralytics reads it upright, 32 wide and 48 high
    Image.new("RGB", (48, 32), (90, 120, 30)).save(src / "g01.jpg", exif=exif)
    objects = [("Tree", (2, 2, 20, 40), False)]
    _write_xml(src / "g01.xml", "g01.jpg", (48, 32), objects)  # images and XML in one folder
    result = invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "out")
    assert_one_line_error(result, "g01.xml", "<size> 48x32", "is 32x48", "EXIF")
    _write_xml(src / "g01.xml", "g01.jpg", (32, 48), objects)
    result = invoke("prepare-voc", "--devkit", src, "--out", tmp_path / "out", "--val-fraction", 0)
    assert result.exit_code == 0, result.output
    _assert_labels(_labels(tmp_path / "out"), _expected([("g01.jpg", (32, 48), objects)], {"Tree": 0}))
    assert yaml.safe_load((tmp_path / "out" / "data.yaml").read_text())["val"] == "images/train"


def test_export_imagesets_define_the_split(tmp_path):
    src = _export(tmp_path / "cvat", EXPORT[:6], images="JPEGImages")
    main = src / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("a01\na02\na03\n")
    (main / "val.txt").write_text("a04\n")
    (main / "test.txt").write_text("a05\n")
    out = tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", src, "--out", out)
    assert result.exit_code == 0, result.output
    assert {d.name: sorted(p.stem for p in d.iterdir()) for d in (out / "images").iterdir()} == {
        "train": ["a01", "a02", "a03"], "val": ["a04"], "test": ["a05"]}
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")
    assert "unlisted: 1 images in no ImageSets/Main list, left out" in result.output
    (main / "val.txt").write_text("a04\nzz9\n")
    assert_one_line_error(invoke("prepare-voc", "--devkit", src, "--out", out), "zz9", "val.txt", "remove the id")
    (main / "val.txt").unlink()
    (main / "test.txt").unlink()
    assert_one_line_error(invoke("prepare-voc", "--devkit", src, "--out", out), "no validation images", "--val-fraction")


def test_export_xml_found_by_its_filename(tmp_path):
    src = tmp_path / "src"
    _write_image(src / "images" / "photo_1.JPG", 40, 30)
    _write_xml(src / "Annotations" / "export-0001.xml", "C:\\data\\photo_1.JPG", (40, 30), [("Tree", (2, 2, 20, 20), False)])
    out = tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--val-fraction", 0)
    assert result.exit_code == 0, result.output
    _assert_labels(_labels(out), _expected([("photo_1.JPG", (40, 30), [("Tree", (2, 2, 20, 20), False)])], {"Tree": 0}))


def test_export_bad_inputs_are_one_line(tmp_path):
    src = _export(tmp_path / "src", EXPORT[:3])
    out = tmp_path / "out"
    for args, needles in [(("--val-fraction", 1), ("--val-fraction", "[0, 1)")),
                          (("--classes", "Tree,Bush,Tree"), ("'Tree' twice",)),
                          (("--classes", "Tree,Bush", "--skip-classes", "Bush"), ("'Bush'", "both"))]:
        assert_one_line_error(invoke("prepare-voc", "--devkit", src, "--out", out, *args), *needles)
    (src / "images" / "a02.PNG").unlink()
    _write_xml(src / "Annotations" / "zz.xml", "zz.png", (32, 32), [])
    assert_one_line_error(invoke("prepare-voc", "--devkit", src, "--out", out), "a02.xml", "has no image",
                          "1 more", "restore the image or remove the XML")
    (src / "Annotations" / "a02.xml").write_text("<annotation><object><name>Tree</name></object></annotation>")
    assert_one_line_error(invoke("prepare-voc", "--devkit", src, "--out", out), "a02.xml", "malformed", "bndbox")
    (src / "Annotations" / "a02.xml").write_text("<annotations><image/></annotations>")  # CVAT's own format
    assert_one_line_error(invoke("prepare-voc", "--devkit", src, "--out", out), "a02.xml", "not a Pascal VOC")
    images_only = tmp_path / "images_only"
    _write_image(images_only / "x.png", 32, 32)
    assert_one_line_error(invoke("prepare-voc", "--devkit", images_only, "--out", out), "no VOC2007", "no Pascal VOC XML")
    assert not out.exists()


def test_devkit_of_other_classes_takes_their_names(voc_devkit, tmp_path):
    import shutil

    kit = tmp_path / "VOCdevkit"
    shutil.copytree(voc_devkit, kit)
    listed = (kit / "VOC2007" / "ImageSets" / "Main" / "train.txt").read_text().split()
    xml = kit / "VOC2007" / "Annotations" / f"{listed[0]}.xml"
    tree = ET.parse(xml)
    tree.getroot().find("object/name").text = "Tree"
    tree.write(xml)
    data_yaml = prepare_voc(kit, tmp_path / "VOC", progress=False)
    names = list(yaml.safe_load(data_yaml.read_text())["names"].values())
    assert "Tree" in names and names == sorted(names) and data_yaml.name == "VOC.yaml"
    with pytest.raises(AtcacheError, match="'Tree' .1 object, first in"):
        prepare_voc(kit, tmp_path / "VOC2", progress=False, classes=VOC_NAMES)


def test_every_object_is_accounted_for(voc_devkit, tmp_path):
    from atcache.data.voc import convert_voc

    for keep in (False, True):
        r = convert_voc(voc_devkit, tmp_path / f"VOC{keep}", progress=False, keep_difficult=keep)
        assert r.names == VOC_NAMES and r.objects > 0
        assert r.objects == r.written + r.difficult_dropped + sum(r.skipped.values()) + r.degenerate
        lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / f"VOC{keep}").glob("labels/*/*.txt"))
        assert lines == r.written and (r.difficult_kept > 0) == keep


# ------------------------------------------------- split folders as Roboflow's "Pascal VOC" export writes them
ROBOFLOW = {  # split folder -> (image name, (w, h), objects): images and XML together, Roboflow's file names
    "train": [("IMG_0001_jpg.rf.3f2a.jpg", (48, 32), [("Tree", (3, 4, 20, 30), False),
                                                      ("Bush", (25, 10, 40, 20), False)]),
              ("IMG_0002_jpg.rf.91c0.jpg", (40, 40), [("Bush", (5, 5, 30, 35), False)]),
              ("IMG_0003_jpg.rf.0b7e.jpg", (32, 48), [("Tree", (1, 1, 32, 48), False), ("Tree", (4, 4, 9, 9), False)])],
    "valid": [("IMG_0004_jpg.rf.77d1.jpg", (40, 32), [("Bush", (2, 2, 20, 20), False)]),
              ("IMG_0005_jpg.rf.e5a9.jpg", (32, 32), [("Tree", (6, 6, 28, 28), False)])],
}


def _roboflow(root, splits=ROBOFLOW):
    for name, items in splits.items():
        _export(root / name, items, images="", annotations="")
    (root / "README.roboflow.txt").write_text("Exported via roboflow.com\n")
    (root / "README.dataset.txt").write_text("# Trees > 2024-05-01\n")
    return root


def test_roboflow_split_folders_define_the_split(tmp_path):
    src, out = _roboflow(tmp_path / "roboflow"), tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--val-fraction", 0.5)  # the folders split it
    assert result.exit_code == 0, result.output
    assert {d.name: sorted(p.name for p in d.iterdir()) for d in (out / "images").iterdir() if any(d.iterdir())} == {
        "train": [n for n, _, _ in ROBOFLOW["train"]], "val": [n for n, _, _ in ROBOFLOW["valid"]]}
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: "Bush", 1: "Tree"} and (data["train"], data["val"]) == ("images/train", "images/val")
    items = ROBOFLOW["train"] + ROBOFLOW["valid"]
    got = _labels(out)
    assert sum(len(rows) for rows in got.values()) == sum(len(o) for _, _, o in items) == 7
    _assert_labels(got, _expected(items, {"Bush": 0, "Tree": 1}))
    assert "images: 5 (train 3, val 2; split by the folders train/, valid/)" in result.output
    assert "objects: 7 in the XML = 7 label lines + 0 difficult" in result.output

    _export(src / "test", [("IMG_0006_jpg.rf.c4d2.jpg", (40, 40), [("Rock", (2, 2, 30, 30), False)])],
            images="images", annotations="Annotations")  # a split folder of images/ + Annotations/
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--classes", "Tree,Bush")
    assert_one_line_error(result, "'Rock'", "IMG_0006_jpg.rf.c4d2.xml", "--skip-classes Rock")
    result = invoke("prepare-voc", "--devkit", src, "--out", out, "--skip-classes", "Rock")
    assert result.exit_code == 0, result.output
    assert "images: 6 (train 3, val 2, test 1; split by the folders train/, valid/, test/)" in result.output
    assert yaml.safe_load((out / "data.yaml").read_text())["test"] == "images/test"
    assert _labels(out)["IMG_0006_jpg.rf.c4d2"] == []


def test_roboflow_train_folder_alone_is_refused(tmp_path):
    src, out = _roboflow(tmp_path / "roboflow", {"train": ROBOFLOW["train"]}), tmp_path / "out"
    result = invoke("prepare-voc", "--devkit", src, "--out", out)
    assert_one_line_error(result, "train/", "no valid/", "add a valid/ folder", f"--devkit {src / 'train'}", "seeded")
    assert not out.exists()
    result = invoke("prepare-voc", "--devkit", src / "train", "--out", out, "--val-fraction", 0.3)
    assert result.exit_code == 0 and "(train 2, val 1; seeded split" in result.output, result.output
