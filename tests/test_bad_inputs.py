"""Odd and bad inputs across the CLI: each gets one clear outcome, and valid odd images give the teacher exactly the
input ultralytics' training pipeline gives (so the cached maps describe what training sees)."""

import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
import zarr
from PIL import Image

from atcache import VOC_NAMES
from atcache.data.splits import read_image, split_files, teacher_input
from atcache.errors import AtcacheError
from helpers import TEST_IMGSZ, assert_one_line_error, build_args, yolo_dataset
from helpers import invoke as run

LAYERS = "16,22"
LABEL = "0 0.5 0.5 0.4 0.4\n"


def build(data, teacher, out, *extra):
    return run(*build_args(data, teacher, out, "--layers", LAYERS, *extra, chunk_rows=4))


def train_from_cache(cache, data, project):
    return run("train-from-cache", "--cache", cache, "--data", data, "--project", project, "--name", "t",
               "--student", "yolo11n.yaml", "--epochs", 1, "--imgsz", TEST_IMGSZ, "--batch", 4, "--device", "cpu",
               "plots=False", "workers=0", "nbs=4", "val=False")


def smooth(h, w, seed=0):
    """A smooth BGR image (compresses small, decodes stably)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.dstack([(xx * 3 + seed * 40) % 256, (yy * 5) % 256, (xx + yy + seed * 17) % 256]).astype(np.uint8)


def write_exif_rotated(path):
    im = Image.fromarray(smooth(20, 36)[..., ::-1].copy())
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(path, exif=exif)


ODD_IMAGES = {  # name -> writer: every kind ultralytics trains on, plus one it drops (tiny)
    "图片_ä.jpg": lambda p: cv2.imencode(".jpg", smooth(40, 48))[1].tofile(p),
    "gray.jpg": lambda p: cv2.imwrite(p, smooth(40, 30)[..., 0]),
    "gray.png": lambda p: cv2.imwrite(p, smooth(30, 40)[..., 1]),
    "cmyk.jpg": lambda p: Image.fromarray(np.dstack([smooth(36, 28), smooth(36, 28, 1)[..., :1]]), "CMYK").save(p),
    "deep.png": lambda p: cv2.imwrite(p, smooth(30, 50).astype(np.uint16) * 257 + 100),
    "deepgray.png": lambda p: cv2.imwrite(p, smooth(50, 30)[..., 2].astype(np.uint16) * 250),
    "rgba.png": lambda p: cv2.imwrite(p, np.dstack([smooth(33, 44), smooth(33, 44, 2)[..., :1]])),
    "exif.jpg": write_exif_rotated,
    "tiny.jpg": lambda p: cv2.imwrite(p, smooth(1, 1)),
    "wide.jpg": lambda p: cv2.imwrite(p, smooth(12, 2000)),
    "tall.jpg": lambda p: cv2.imwrite(p, smooth(2000, 12)),
}


def make_dataset(root: Path, images: dict, orphan_labels=()) -> Path:
    """An ultralytics layout root/images/train + labels/train (one box each) and its data YAML (val = train)."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for name, write in images.items():
        write(str(root / "images" / "train" / name))
        (root / "labels" / "train" / f"{Path(name).stem}.txt").write_text(LABEL)
    for name in orphan_labels:
        (root / "labels" / "train" / name).write_text(LABEL)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train",
                                    "names": dict(enumerate(VOC_NAMES))}, allow_unicode=True))
    return data


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """Non-ASCII dataset root with grey/CMYK/16-bit/RGBA/EXIF/1x1/2000x12/12x2000 images and a label without image."""
    return make_dataset(tmp_path_factory.mktemp("odd") / "données", ODD_IMAGES, orphan_labels=["sans_image.txt"])


def test_teacher_input_equals_ultralytics_for_every_image_kind(odd_data):
    from ultralytics.data.augment import LetterBox

    ds = yolo_dataset(odd_data)
    kept = sorted(Path(f).name for f in ds.im_files)
    assert kept == sorted(set(ODD_IMAGES) - {"tiny.jpg"})  # ultralytics drops images under 10 px
    for i, f in enumerate(ds.im_files):
        ref, (h0, w0), (h, w) = ds.load_image(i)
        ref = LetterBox(new_shape=(TEST_IMGSZ, TEST_IMGSZ), scaleup=False, center=True)(image=ref)
        ours, lb = teacher_input(f, TEST_IMGSZ)  # as build-cache feeds the teacher
        np.testing.assert_array_equal(ours, ref, err_msg=f)
        assert tuple(lb[:4]) == (h0, w0, h, w), f
    assert read_image(Path(ds.im_files[0]).parent / "exif.jpg").shape == (36, 20, 3)  # upright, as ultralytics
    tiny, lb = teacher_input(odd_data.parent / "images" / "train" / "tiny.jpg", TEST_IMGSZ)
    assert tiny.shape == (TEST_IMGSZ, TEST_IMGSZ, 3) and tuple(lb[:4]) == (1, 1, TEST_IMGSZ, TEST_IMGSZ)


@pytest.mark.slow
def test_odd_images_build_inspect_and_train(odd_data, teacher_pt, tmp_path):
    from atcache.train.targets import CacheTargets

    root = odd_data.parent
    out = tmp_path / "缓存.zarr"
    result = build(odd_data, teacher_pt, out)
    assert result.exit_code == 0, result.output
    assert f"{len(ODD_IMAGES)} images" in result.output and "0 skipped" in result.output
    g = zarr.open_group(str(out), mode="r")
    files = [str(f) for f in g["files"][:]]
    assert files == sorted(f"images/train/{n}" for n in ODD_IMAGES)  # orphan label: ignored, as ultralytics does
    assert g["done"][:].all()
    lb = {Path(f).name: row for f, row in zip(files, g["letterbox"][:])}
    np.testing.assert_array_equal(lb["wide.jpg"][:6], [12, 2000, 1, 64, 31, 0])
    np.testing.assert_array_equal(lb["tall.jpg"][:6], [2000, 12, 64, 1, 0, 31])
    np.testing.assert_array_equal(lb["tiny.jpg"], [1, 1, 64, 64, 0, 0, 64])

    inspected = run("inspect", "--cache", out)
    assert inspected.exit_code == 0 and f"{len(ODD_IMAGES)}/{len(ODD_IMAGES)} rows done" in inspected.output

    ds = yolo_dataset(odd_data)  # training joins by path exactly the images ultralytics kept
    cache = CacheTargets.load(out, (16, 22))
    rows = cache.rows_for(ds.im_files, root)
    assert [cache.files[r] for r in rows] == [Path(f).relative_to(root).as_posix() for f in ds.im_files]
    assert "images/train/tiny.jpg" not in [cache.files[r] for r in rows]

    trained = train_from_cache(out, odd_data, tmp_path / "runs")
    assert trained.exit_code == 0, (trained.output, trained.exception)
    assert (tmp_path / "runs" / "t" / "results.csv").is_file()
    assert split_files(odd_data, "train").fingerprint() == g.attrs["atcache"]["dataset_fingerprint"]  # files untouched


@pytest.fixture
def broken_jpegs(tmp_path) -> Path:
    """Two good JPEGs, one cut in half (truncated) and one with bytes after its end marker (ultralytics re-saves it)."""
    whole = cv2.imencode(".jpg", smooth(48, 64))[1].tobytes()
    images = {
        "a.jpg": lambda p: cv2.imwrite(p, smooth(40, 56, 1)),
        "b.jpg": lambda p: cv2.imwrite(p, smooth(56, 40, 2)),
        "cut.jpg": lambda p: Path(p).write_bytes(whole[: len(whole) // 2]),
        "tail.jpg": lambda p: Path(p).write_bytes(whole + b"\0" * 16),
    }
    return make_dataset(tmp_path / "broken", images)


def test_truncated_and_unterminated_jpegs_end_to_end(broken_jpegs, teacher_pt, tmp_path):
    from atcache.train.trainer import check_cache

    images = broken_jpegs.parent / "images" / "train"
    cut, tail = images / "cut.jpg", images / "tail.jpg"
    before = {p: p.read_bytes() for p in (cut, tail)}
    out = tmp_path / "c.zarr"
    assert_one_line_error(build(broken_jpegs, teacher_pt, out), "cut.jpg", "truncated or corrupt JPEG", "--skip-bad")

    skipped = build(broken_jpegs, teacher_pt, out, "--overwrite", "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert "skipped images/train/cut.jpg: " in skipped.output and "skipped images/train/tail.jpg: " in skipped.output
    assert "does not end with its FFD9 end marker" in skipped.output
    assert list(zarr.open_group(str(out), mode="r")["done"][:]) == [True, True, False, False]
    inspected = run("inspect", "--cache", out)
    assert inspected.exit_code == 0 and "2/4 rows done" in inspected.output

    refused = train_from_cache(out, broken_jpegs, tmp_path / "runs")
    assert_one_line_error(refused, "cut.jpg")
    assert {p: p.read_bytes() for p in (cut, tail)} == before  # refused before ultralytics' scan could re-save them

    # the fixes the messages name: re-save tail.jpg as ultralytics does (the exact command), delete cut.jpg
    fix = re.search(r'python -c "(.*?)"', skipped.output).group(1)
    exec(fix, {})
    cut.unlink()
    assert tail.read_bytes()[-2:] == b"\xff\xd9"
    rebuilt = build(broken_jpegs, teacher_pt, out, "--overwrite")
    assert rebuilt.exit_code == 0 and "3 images" in rebuilt.output, rebuilt.output
    check_cache(out, (16, 22), TEST_IMGSZ, split_files(broken_jpegs, "train"))  # training now accepts the cache
    ours, _ = teacher_input(tail, TEST_IMGSZ)
    from ultralytics.data.augment import LetterBox

    ds = yolo_dataset(broken_jpegs)
    i = ds.im_files.index(str(tail))
    ref = LetterBox(new_shape=(TEST_IMGSZ, TEST_IMGSZ), scaleup=False, center=True)(image=ds.load_image(i)[0])
    np.testing.assert_array_equal(ours, ref)
    assert tail.read_bytes()[-2:] == b"\xff\xd9"  # ultralytics' scan found nothing more to re-save


def test_empty_datasets_are_one_line_errors(teacher_pt, tmp_path):
    empty = make_dataset(tmp_path / "empty", {}, orphan_labels=["a.txt"])
    assert_one_line_error(build(empty, teacher_pt, tmp_path / "c.zarr"), "has no images under", "label files alone")
    refused = run("train-from-cache", "--cache", tmp_path / "c.zarr", "--layers", LAYERS, "--data", empty,
                  "--project", tmp_path, "--student", "yolo11n.yaml", "--imgsz", TEST_IMGSZ, "--device", "cpu")
    assert_one_line_error(refused, "has no images under")
    listed = tmp_path / "empty" / "list.yaml"
    (tmp_path / "empty" / "list.txt").write_text("\n")
    listed.write_text(yaml.safe_dump({"path": str(tmp_path / "empty"), "train": "list.txt", "val": "list.txt",
                                      "names": {0: "a"}}))
    assert_one_line_error(build(listed, teacher_pt, tmp_path / "c.zarr"), "list.txt", "has no images")
    assert not (tmp_path / "c.zarr").exists()


def test_plain_train_on_an_empty_dataset_is_one_line(tmp_path):
    empty = make_dataset(tmp_path / "empty", {}, orphan_labels=["a.txt"])
    result = run("train", "--data", empty, "--project", tmp_path, "--student", "yolo11n.yaml", "--epochs", 1,
                 "--imgsz", TEST_IMGSZ, "--device", "cpu", "workers=0")
    assert_one_line_error(result, "has no images under")


def test_listed_image_that_is_missing_names_the_file(teacher_pt, tmp_path):
    data = make_dataset(tmp_path / "d", {"a.jpg": lambda p: cv2.imwrite(p, smooth(30, 40))})
    (tmp_path / "d" / "train.txt").write_text("./images/train/a.jpg\n./images/train/gone.jpg\n")
    cfg = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**cfg, "train": "train.txt"}))
    assert_one_line_error(build(data, teacher_pt, tmp_path / "c.zarr"), "gone.jpg does not exist", "--skip-bad")


def test_split_refusals_name_the_fix(tmp_path):
    data = make_dataset(tmp_path / "d", {"a.jpg": lambda p: cv2.imwrite(p, smooth(30, 40))})
    bad = os.fsencode(tmp_path / "d" / "images" / "train") + b"/caf\xe9.jpg"  # a Latin-1 name, not UTF-8
    shutil.copy(tmp_path / "d" / "images" / "train" / "a.jpg", bad)
    with pytest.raises(AtcacheError, match="caf.*not valid UTF-8.*rename it"):
        split_files(data, "train")
    os.unlink(bad)
    cfg = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**cfg, "channels": 1}))
    with pytest.raises(AtcacheError, match="channels: 1.*3-channel"):
        split_files(data, "train")


# ---------------------------------------------------------------------- VOCdevkit (prepare-voc)
@pytest.fixture
def small_devkit(tmp_path) -> Path:
    from atcache.data.synthetic import make_demo_data

    return make_demo_data(tmp_path / "src", images=10, size=32, seed=3, progress=False)


def test_voc_empty_imagesets_list(small_devkit, tmp_path):
    for listing in small_devkit.glob("VOC*/ImageSets/Main/*.txt"):
        listing.write_text("" if listing.stem != "test" else listing.read_text())
    result = run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC")
    assert_one_line_error(result, "lists no training images", "train.txt", "one per line")


def test_voc_annotations_without_images(small_devkit, tmp_path):
    voc = small_devkit / "VOC2012"
    listed = (voc / "ImageSets" / "Main" / "train.txt").read_text().split()
    shutil.copy(voc / "Annotations" / f"{listed[0]}.xml", voc / "Annotations" / "2012_999999.xml")  # unlisted, no JPEG
    result = run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC")
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "VOC").rglob("2012_999999*"))  # the ImageSets lists define the dataset
    (voc / "JPEGImages" / f"{listed[1]}.jpg").unlink()  # listed, JPEG missing
    result = run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC")
    assert_one_line_error(result, f"{listed[1]}.jpg", "missing", "remove the id")
    shutil.copy(voc / "JPEGImages" / f"{listed[0]}.jpg", voc / "JPEGImages" / f"{listed[1]}.jpg")
    (voc / "Annotations" / f"{listed[2]}.xml").unlink()  # listed, annotation missing
    result = run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC")
    assert_one_line_error(result, f"{listed[2]}.xml", "missing", "remove the id")


def test_voc_unterminated_jpeg_is_converted_as_ultralytics_resaves_it(small_devkit, tmp_path):
    from ultralytics.data.utils import check_image

    voc = small_devkit / "VOC2012"
    ids = (voc / "ImageSets" / "Main" / "train.txt").read_text().split()
    tail, cut = voc / "JPEGImages" / f"{ids[0]}.jpg", voc / "JPEGImages" / f"{ids[1]}.jpg"
    tail.write_bytes(tail.read_bytes() + b"\0" * 16)
    original = tail.read_bytes()
    data_yaml = tmp_path / "VOC" / "VOC.yaml"
    assert run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC").exit_code == 0
    converted = tmp_path / "VOC" / "images" / "train2012" / tail.name
    expected = tmp_path / "expected.jpg"
    shutil.copy(tail, expected)
    assert "restored and saved" in check_image(str(expected))[0]
    assert converted.read_bytes() == expected.read_bytes() and tail.read_bytes() == original  # devkit intact
    assert read_image(converted).shape[:2] == read_image(expected).shape[:2]
    assert run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC").exit_code == 0  # idempotent
    assert converted.read_bytes() == expected.read_bytes() and data_yaml.is_file()
    cut.write_bytes(cut.read_bytes()[:200])
    result = run("prepare-voc", "--devkit", small_devkit, "--out", tmp_path / "VOC")
    assert_one_line_error(result, cut.name, "truncated or corrupt JPEG", "ImageSets")


# ------------------------------------------------------------------------------- one line for every bad input
def _bad_inputs(data, teacher, cache):
    """(command line, words the one error line names) for every command: each refused before any work starts."""
    train = ["--student", "yolo11n.yaml", "--data", data, "--epochs", "1", "--imgsz", "64", "--batch", "4",
             "--device", "cpu", "--project", "runs"]
    build = ["build-cache", "--teacher", teacher, "--data", data, "--out", "new.zarr", "--imgsz", "64", "--device", "cpu"]
    fid = ["fidelity", "--cache", cache, "--teacher", teacher, "--data", data, "--device", "cpu"]
    return [
        (["make-demo-data", "--out", "demo", "--images", "2"], ["--images"]),
        (["make-demo-data", "--out", "demo", "--size", "big"], ["--size", "--help"]),
        (["prepare-voc", "--devkit", "nowhere", "--out", "voc"], ["nowhere"]),
        (["prepare-voc", "--out", "voc"], ["--devkit"]),
        ([*build, "--kind", "bogus"], ["--kind", "sum_p"]),
        ([*build, "--dtype", "float8"], ["--dtype", "uint8"]),
        ([*build, "--batch", "0"], ["--batch", "at least 1"]),
        ([*build, "--batch", "abc"], ["--batch"]),
        ([*build, "--p", "nan"], ["--p", "finite"]),
        ([*build, "--chunk-rows", "0"], ["--chunk-rows"]),
        ([*build, "--layers", "six"], ["--layers"]),
        ([*build, "--shard", "3/2"], ["--shard"]),
        ([*build, "--scheduler", "sync"], ["--scheduler"]),
        ([*build, "--device", "99"], ["--device", "no CUDA device 99"]),
        ([*build, "--replay-epochs", "2", "mosaic=2"], ["mosaic"]),
        (["train", *train, "mosaic=2"], ["mosaic"]),
        (["train", *train, "lr0=abc"], ["lr0"]),
        (["train", *train, "bogus=1"], ["bogus"]),
        (["train", *train, "--epochs", "0"], ["--epochs"]),
        (["train", *train, "--device", "99"], ["--device", "99"]),
        (["train", *train, "--flip-weight", "-1"], ["--flip-weight"]),
        (["train-from-cache", "--cache", cache, *train, "--at-weight", "-1"], ["--at-weight", "at least 0"]),
        (["train-from-cache", "--cache", cache, *train, "--at-weight", "nan"], ["--at-weight", "finite"]),
        (["train-from-cache", "--cache", cache, *train, "--gradient-weight", "inf"], ["--gradient-weight", "finite"]),
        (["train-from-cache", "--cache", cache, *train, "--targets", "bogus"], ["--targets", "replay"]),
        (["train-from-cache", "--cache", cache, *train, "--shuffle-window", "0"], ["--shuffle-window"]),
        (["train-from-cache", "--cache", cache, *train, "hsv_h=-1"], ["hsv_h"]),
        (["train-online", "--teacher", teacher, *train, "--kind", "bogus"], ["--kind"]),
        (["train-online", "--teacher", teacher, *train, "--p", "0"], ["--p"]),
        (["train-online", "--teacher", teacher, *train, "--at-weight", "-0.5"], ["--at-weight"]),
        (["demo", "--out", "demo", "--device", "99"], ["--device"]),
        (["demo", "--out", "demo", "--imgsz", "0"], ["--imgsz"]),
        (["study", "--out", "study", "--modes", "plain,bogus"], ["--modes", "bogus"]),
        (["study", "--out", "study", "--at-weights", "1,-1"], ["--at-weights"]),
        (["study", "--out", "study", "--device", "99"], ["--device"]),
        (["bench", "--out", "bench", "--device", "99"], ["--device"]),
        (["bench", "--out", "bench", "--steps", "0"], ["--steps"]),
        (["inspect"], ["no cache given"]),
        (["inspect", cache, "--workers", "0"], ["--workers"]),
        (["inspect", "missing.zarr"], ["missing.zarr"]),
        (["visualize", cache, "--data", data, "--out", "vis", "--images", "0"], ["--images"]),
        ([*fid, "--targets", "bogus"], ["--targets"]),
        ([*fid, "--batches", "0"], ["--batches"]),
        ([*fid, "mosaic=2"], ["mosaic"]),
        (["fidelity", "--cache", cache, "--teacher", teacher, "--data", data, "--device", "99"], ["--device"]),
        (["bogus-command"], ["bogus-command"]),
    ]


def _tree_of(*roots) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for root in roots for p in Path(root).rglob("*")}


def test_every_bad_input_is_one_line_exit_2_and_nothing_written(voc_yaml, teacher_pt, built_cache, tmp_path,
                                                                 monkeypatch):
    """Every command refuses each bad input of the table in one `atcache: error:` line (exit 2, no traceback) before
    it writes anything: no file appears or changes in the working folder, the dataset or the cache."""
    monkeypatch.chdir(tmp_path)
    dataset = Path(voc_yaml).parent
    before = _tree_of(tmp_path, dataset, built_cache)
    failures = []
    for args, needles in _bad_inputs(str(voc_yaml), str(teacher_pt), str(built_cache)):
        result = run(*args)
        try:
            assert_one_line_error(result, *needles)
        except AssertionError as e:
            failures.append(f"atcache {' '.join(args[:1] + args[-2:])}: {e}")
        if _tree_of(tmp_path, dataset, built_cache) != before:
            failures.append(f"atcache {' '.join(args)} wrote {set(_tree_of(tmp_path, dataset, built_cache)) ^ set(before)}")
            before = _tree_of(tmp_path, dataset, built_cache)
    assert not failures, "\n".join(failures)
