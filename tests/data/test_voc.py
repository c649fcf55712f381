import xml.etree.ElementTree as ET

import pytest
import yaml

from atcache import VOC_NAMES
from atcache.errors import AtcacheError
from atcache.data.voc import prepare_voc, voc_box_to_yolo


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
