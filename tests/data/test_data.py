import cv2
import numpy as np
import pytest

from atcache.data.splits import LetterboxedImages, letterbox_image, read_image, split_files
from atcache.errors import AtcacheError
from helpers import yolo_dataset


def test_split_files_match_ultralytics_order(voc_yaml):
    sf = split_files(voc_yaml, "train")
    ds = yolo_dataset(voc_yaml, "train", 64)
    assert [str(sf.root / f) for f in sf.files] == ds.im_files
    assert all(not f.startswith("/") for f in sf.files)
    assert len(sf.names) == 20


@pytest.mark.parametrize("imgsz", [64, 160])  # down- and up-scaling
def test_teacher_input_is_ultralytics_load_image_then_centred_letterbox(voc_yaml, imgsz):
    from ultralytics.data.augment import LetterBox

    sf = split_files(voc_yaml, "train")
    ds = yolo_dataset(voc_yaml, "train", imgsz)
    for i in range(5):
        ref, (h0, w0), (h, w) = ds.load_image(i)
        ref = LetterBox(new_shape=(imgsz, imgsz), scaleup=False, center=True)(image=ref)
        ours, lb = letterbox_image(read_image(sf.absolute(i)), imgsz)
        assert ours.shape == (imgsz, imgsz, 3)
        np.testing.assert_array_equal(ours, ref)
        assert tuple(lb[:4]) == (h0, w0, h, w)
        top, left = int(lb[4]), int(lb[5])
        assert (ours[:top] == 114).all() and (ours[:, :left] == 114).all()


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
            with pytest.raises(OSError):  # ultralytics cannot re-save it: its scan drops the image
                check_image(str(probe))
        else:
            assert ("restored and saved" in check_image(str(probe))[0]) == (state == "resave"), name
    with pytest.raises(AtcacheError, match="tail.jpg is a JPEG that does not end with its FFD9 end marker"):
        read_image(tmp_path / "tail.jpg")
    with pytest.raises(AtcacheError, match="cut.jpg is a truncated or corrupt JPEG"):
        read_image(tmp_path / "cut.jpg")
    assert read_image(tmp_path / "png_named.jpg").shape == (24, 32, 3)
