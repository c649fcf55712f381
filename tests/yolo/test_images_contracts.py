"""Contracts of the ultralytics internals atcache.yolo.images relies on to give the teacher ultralytics' own
un-augmented training input: the dataset hooks it overrides or calls, what `get_image_and_label` and `LetterBox`
record, `check_image`'s re-save and the 3-channel decode flag. A failure names the ultralytics attribute that changed.
CI runs these on the newest and the oldest ultralytics of the supported range."""

from __future__ import annotations

import inspect
import shutil

import cv2
import numpy as np
import pytest

from helpers import TEST_IMGSZ
from atcache.yolo import YOLODataset, check_det_dataset, ultralytics_attr
from atcache.yolo.images import (IMREAD_FLAGS, LOADED_SHAPE_KEY, PAD_VALUE, TeacherInputs, check_image,
                                 centred_letterbox, letterbox_pad, list_images)

pytestmark = pytest.mark.release_range  # also run on the oldest ultralytics of the range (CI)
BaseDataset = ultralytics_attr("ultralytics.data.base", "BaseDataset")


@pytest.mark.parametrize("cls, hooks", [
    (BaseDataset, ("get_img_files", "get_labels", "get_image_and_label", "load_image", "build_transforms")),
    (YOLODataset, ("get_label_files", "verify_args", "result_to_label")),
])
def test_the_dataset_hooks_teacher_inputs_uses_exist(cls, hooks):
    for name in hooks:
        assert callable(getattr(cls, name, None)), f"ultralytics {cls.__name__}.{name} is gone (TeacherInputs uses it)"
    assert "img_path" in inspect.signature(cls.get_img_files).parameters, \
        f"ultralytics {cls.__name__}.get_img_files(img_path) changed its signature"


def test_the_three_channel_decode_flag_is_imread_color(voc_yaml):
    files = list_images(check_det_dataset(str(voc_yaml))["train"])[:2]
    ds = TeacherInputs(files, TEST_IMGSZ)
    assert getattr(ds, "cv2_flag", None) == IMREAD_FLAGS, "ultralytics BaseDataset.cv2_flag for 3 channels changed"


def test_get_image_and_label_reports_the_loaded_shape_and_letterbox_its_padding(voc_yaml):
    """`resized_shape` is load_image's output shape (kept before LetterBox overwrites it); LetterBox records its
    (left, top) padding in `ratio_pad[1]`: the padded border is grey, the image starts there."""
    files = list_images(check_det_dataset(str(voc_yaml))["train"])
    ds = TeacherInputs(files[:4], TEST_IMGSZ)
    for i in range(len(ds)):
        _, _, (h, w) = ds.load_image(i)  # (image, original (h0, w0), loaded (h, w))
        sample = ds[i]
        assert sample[LOADED_SHAPE_KEY] == (h, w), "ultralytics get_image_and_label's 'resized_shape' is not load_image's"
        assert "ratio_pad" in sample, "ultralytics LetterBox no longer records 'ratio_pad'"
        top, left = letterbox_pad(sample)
        img = sample["img"].numpy().transpose(1, 2, 0)  # (H, W, 3) RGB
        assert (top, left) == ((TEST_IMGSZ - h) // 2, (TEST_IMGSZ - w) // 2) or \
            abs(top - (TEST_IMGSZ - h) / 2) <= 0.5 and abs(left - (TEST_IMGSZ - w) / 2) <= 0.5, \
            f"ultralytics LetterBox 'ratio_pad'[1] is not (left, top) of a centred image: {sample['ratio_pad']}"
        if top:
            assert (img[:top] == PAD_VALUE).all(), "ultralytics LetterBox padding above the image is not grey"
        if left:
            assert (img[:, :left] == PAD_VALUE).all(), "ultralytics LetterBox padding left of the image is not grey"


def test_centred_letterbox_takes_ultralytics_arguments():
    lb = centred_letterbox(TEST_IMGSZ)
    out = lb(image=np.zeros((20, 40, 3), np.uint8))
    assert out.shape == (TEST_IMGSZ, TEST_IMGSZ, 3), "ultralytics LetterBox(image=...) no longer returns the image"


def test_check_image_resaves_a_jpeg_without_its_end_marker(tmp_path):
    whole = cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "tail.jpg").write_bytes(whole + b"\0\0")
    shutil.copy(tmp_path / "tail.jpg", tmp_path / "probe.jpg")
    message, _ = check_image(str(tmp_path / "probe.jpg"))
    assert message, "ultralytics utils.data.check_image no longer says it re-saved a JPEG without FFD9"
    assert (tmp_path / "probe.jpg").read_bytes()[-2:] == b"\xff\xd9", "check_image no longer re-saves it in place"
