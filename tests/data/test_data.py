import cv2
import numpy as np
import pytest
import torch

from atcache.data.splits import LetterboxedImages, letterbox_image, read_image, split_files, teacher_input
from atcache.errors import AtcacheError
from helpers import yolo_dataset


def test_split_files_match_ultralytics_order(voc_yaml):
    import random

    state = random.getstate()
    sf = split_files(voc_yaml, "train")
    assert random.getstate() == state  # ultralytics' listing samples files for its speed check: restored
    ds = yolo_dataset(voc_yaml, "train", 64)
    assert [str(sf.root / f) for f in sf.files] == ds.im_files
    assert all(not f.startswith("/") for f in sf.files)
    assert len(sf.names) == 20


@pytest.mark.release_range
@pytest.mark.parametrize("imgsz", [64, 160])  # down- and up-scaling
def test_teacher_input_is_ultralytics_load_image_then_centred_letterbox(voc_yaml, imgsz):
    """The build's input (`teacher_input`, a LetterboxedImages item) and the helper for decoded arrays
    (`letterbox_image`) both equal ultralytics' load_image then a centred LetterBox."""
    from ultralytics.data.augment import LetterBox

    sf = split_files(voc_yaml, "train")
    ds = yolo_dataset(voc_yaml, "train", imgsz)
    for i in range(5):
        ref, (h0, w0), (h, w) = ds.load_image(i)
        ref = LetterBox(new_shape=(imgsz, imgsz), scaleup=False, center=True)(image=ref)
        built, built_lb = teacher_input(sf.absolute(i), imgsz)
        ours, lb = letterbox_image(read_image(sf.absolute(i)), imgsz)
        assert ours.shape == built.shape == (imgsz, imgsz, 3)
        np.testing.assert_array_equal(built, ref)
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(built_lb, lb)
        assert tuple(lb[:4]) == (h0, w0, h, w)
        top, left = int(lb[4]), int(lb[5])
        assert (ours[:top] == 114).all() and (ours[:, :left] == 114).all()


@pytest.mark.release_range
def test_teacher_inputs_and_labels_are_ultralytics_un_augmented_samples(voc_yaml):
    """With labels (build-cache --gradient), each row is exactly what ultralytics' YOLODataset(augment=False) makes
    of its image and labels: the same image tensor, classes and letterboxed boxes, collated by its collate_fn."""
    from atcache.yolo import YOLODataset, check_det_dataset, get_cfg
    from atcache.yolo.images import IMREAD_FLAGS

    sf = split_files(voc_yaml, "train")
    data = check_det_dataset(str(voc_yaml))
    ref = YOLODataset(img_path=data["train"], imgsz=64, augment=False, hyp=get_cfg(), data=data, prefix="")
    assert ref.im_files == [str(sf.absolute(i)) for i in range(len(sf.files))]
    rows = [0, 3, 7, len(sf.files) - 1]
    loaded = LetterboxedImages(sf, rows, 64, labels=True)
    assert loaded.inputs.cv2_flag == IMREAD_FLAGS
    rows_, images, _, errors, labels = LetterboxedImages.collate([loaded[k] for k in range(len(rows))])
    want = YOLODataset.collate_fn([ref[r] for r in rows])
    assert rows_.tolist() == rows and list(errors) == [""] * len(rows) and len(labels["cls"]) > 0
    torch.testing.assert_close(images, want["img"], rtol=0, atol=0)
    for key in ("batch_idx", "cls", "bboxes"):
        torch.testing.assert_close(labels[key], want[key].float(), rtol=0, atol=0)


def test_fingerprint_changes_with_file_size(voc_yaml, tmp_path):
    sf = split_files(voc_yaml, "val")
    before = sf.fingerprint()
    assert before == split_files(voc_yaml, "val").fingerprint()
    target = sf.absolute(0)
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"\0")
        assert split_files(voc_yaml, "val").fingerprint() != before
    finally:
        target.write_bytes(original)


def test_bad_split_and_missing_yaml(voc_yaml, tmp_path):
    with pytest.raises(AtcacheError, match="split 'holdout' is not in"):
        split_files(voc_yaml, "holdout")
    with pytest.raises(AtcacheError, match="does not exist"):
        split_files(tmp_path / "nope.yaml", "train")


def test_bad_images_are_reported_not_raised_in_workers(tmp_path):
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.full((20, 30, 3), 50, np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    from atcache.data.splits import SplitFiles

    sf = SplitFiles(root=tmp_path, split="train", files=("good.jpg", "bad.jpg", "gone.jpg"), data_yaml="", names=())
    ds = LetterboxedImages(sf, [0, 1, 2], 32)
    assert ds[0][3] == "" and tuple(ds[0][1].shape) == (3, 32, 32)
    assert "bad.jpg cannot be decoded" in ds[1][3]
    assert "gone.jpg does not exist" in ds[2][3]
    with_labels = LetterboxedImages(sf, [0, 1, 2], 32, labels=True)
    _, _, letterbox, errors, labels = LetterboxedImages.collate([with_labels[k] for k in range(3)])
    assert errors[0] == "" and errors[1] and errors[2] and np.isnan(letterbox[1:].numpy()).all()
    assert len(labels["cls"]) == len(labels["bboxes"]) == len(labels["batch_idx"]) == 0  # no label files here


def test_labels_are_never_read_from_a_jpeg_ultralytics_would_resave(tmp_path):
    """Reading labels runs ultralytics' check_image, which re-saves a JPEG without its end marker in place: such an
    image is refused first, and the file is left as it was."""
    from atcache.data.splits import SplitFiles
    from atcache.yolo.images import TeacherInputs

    whole = cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "tail.jpg").write_bytes(whole + b"\0\0")
    (tmp_path / "labels" / "tail.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    sf = SplitFiles(root=tmp_path, split="train", files=("images/tail.jpg",), data_yaml="", names=("a",))
    item = LetterboxedImages(sf, [0], 32, labels=True)[0]
    assert "does not end with its FFD9 end marker" in item[3] and len(item[4]["cls"]) == 0
    with pytest.raises(ValueError, match="would re-save"):
        TeacherInputs([tmp_path / "images" / "tail.jpg"], 32, names=("a",), labels=True)[0]
    assert (tmp_path / "images" / "tail.jpg").read_bytes() == whole + b"\0\0"


def test_jpeg_end_state_matches_ultralytics_check_image(tmp_path):
    import shutil

    from ultralytics.data.utils import check_image

    from atcache.data.splits import jpeg_end_state

    whole = cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))[1].tobytes()
    png = cv2.imencode(".png", np.full((24, 32, 3), 90, np.uint8))[1].tobytes()
    cases = {"ok.jpg": (whole, ""), "tail.jpg": (whole + b"\0\0", "resave"), "cut.jpg": (whole[:-40], "truncated"),
             "png_named.jpg": (png, "")}
    for name, (data, state) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert jpeg_end_state(tmp_path / name) == state, name
        probe = tmp_path / f"probe_{name}"
        shutil.copy(tmp_path / name, probe)
        if state == "truncated":
            with pytest.raises(Exception):  # noqa: B017 - ultralytics cannot re-save it (OSError; 8.4.150: an
                check_image(str(probe))      # ImportError of its HEIF plugin): its scan drops the image either way
        else:
            assert ("restored and saved" in check_image(str(probe))[0]) == (state == "resave"), name
    with pytest.raises(AtcacheError, match="tail.jpg is a JPEG that does not end with its FFD9 end marker"):
        read_image(tmp_path / "tail.jpg")
    with pytest.raises(AtcacheError, match="cut.jpg is a truncated or corrupt JPEG"):
        read_image(tmp_path / "cut.jpg")
    assert read_image(tmp_path / "png_named.jpg").shape == (24, 32, 3)
