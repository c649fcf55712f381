"""Contracts of the ultralytics internals the adapter (atcache.yolo) reads: each adapter function over a private
attribute, against the real ultralytics objects (transforms applied to the synthetic data's images, its dataset, a
YOLO11n / YOLO26n criterion). A failure names the ultralytics attribute that changed. CI runs these on the newest and
the oldest ultralytics of the supported range."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from helpers import TEST_IMGSZ, train_dataset
from atcache.yolo import (Compose, LetterBox, MixUp, Mosaic, RandomFlip, RandomPerspective, YOLODataset,
                          build_yolo_dataset, check_det_dataset, get_cfg, ultralytics_attr, ultralytics_version)
from atcache.yolo.datasets import OTHER_DATASET_TASKS, dataset_arguments, loaded_shape
from atcache.yolo.loss import criterion_gains, detection_loss, model_criterion, raw_predictions, set_loss_gains
from atcache.yolo.transforms import (affine_matrix, copy_transform, disable_mosaic_buffer, flip_direction,
                                     letterbox_placement, mix_partner, mixup_ratio, mosaic_tiles, pre_transform,
                                     set_pre_transform)

pytestmark = pytest.mark.release_range  # also run on the oldest ultralytics of the range (CI)


@pytest.fixture(scope="module")
def dataset(voc_yaml):
    """ultralytics' training dataset (build_yolo_dataset, mode train) with MixUp on."""
    return train_dataset(voc_yaml, mixup=0.5)[0]


def recording(cls):
    """ultralytics' transform class `cls` with apply_image keeping what it is handed (as atcache's tracked transforms
    read it): `seen_labels` (a shallow copy, before the step) and `seen_params`."""

    class Recording(cls):
        def apply_image(self, labels, params=None):
            self.seen_labels, self.seen_params = dict(labels), params
            return super().apply_image(labels, params)

    return Recording


def sample(dataset, i: int = 0, size: int | None = None) -> dict:
    """Sample i as get_image_and_label gives it, letterboxed to size x size when given."""
    labels = dataset.get_image_and_label(i)
    return LetterBox(new_shape=(size, size))(labels) if size else labels


def walk(t, out=None) -> list:
    """Every transform reached from `t` (Compose children, pre_transforms), once."""
    out = [] if out is None else out
    if t is None or any(t is x for x in out):
        return out
    out.append(t)
    for child in t.transforms if isinstance(t, Compose) else []:
        walk(child, out)
    walk(pre_transform(t), out)
    return out


# ------------------------------------------------------------------------------------------ transforms
def test_transforms_keep_their_state_in_instance_attributes(dataset):
    """copy_transform copies `__dict__`: every transform of ultralytics' training pipeline keeps its state there."""
    for t in walk(dataset.transforms):
        name = type(t).__name__
        slots = [c.__name__ for c in type(t).__mro__ if "__slots__" in vars(c)]
        assert not slots, f"ultralytics {name} now has __slots__ (in {slots}): copy_transform copies only __dict__"
        copy = copy_transform(t)
        assert type(copy) is type(t) and copy is not t, f"copy_transform of {name}"
        assert vars(copy).keys() == vars(t).keys() and all(vars(copy)[k] is v for k, v in vars(t).items()), name
    rec = copy_transform(next(t for t in walk(dataset.transforms) if isinstance(t, Mosaic)), recording(Mosaic))
    assert isinstance(rec, Mosaic) and rec.imgsz == TEST_IMGSZ


def test_transforms_are_applied_through_get_params_and_apply_image(dataset):
    """atcache's tracked transforms override apply_image(labels, params): __call__ must hand it get_params' dict."""
    for cls, kwargs in ((RandomFlip, {"p": 1.0}), (LetterBox, {"new_shape": (TEST_IMGSZ, TEST_IMGSZ)}),
                        (RandomPerspective, {"size": (TEST_IMGSZ, TEST_IMGSZ)})):
        t = recording(cls)(**kwargs)
        t(sample(dataset, 1))
        assert isinstance(getattr(t, "seen_params", None), dict), \
            f"ultralytics {cls.__name__}.__call__ no longer calls apply_image(labels, params) with get_params' dict"


def test_mix_transforms_apply_their_pre_transform_to_partners(dataset):
    """pre_transform / set_pre_transform: MixUp's `.pre_transform` is what BaseMixTransform.get_params runs on
    every partner."""
    mixup = next(t for t in walk(dataset.transforms) if isinstance(t, MixUp))
    assert hasattr(mixup, "pre_transform"), "ultralytics MixUp (BaseMixTransform) no longer has .pre_transform"
    assert pre_transform(mixup) is not None, "ultralytics' pipeline no longer gives MixUp a .pre_transform"
    calls = []
    copy = copy_transform(mixup)
    set_pre_transform(copy, lambda labels: calls.append(labels) or labels)
    copy.get_params(sample(dataset))
    assert len(calls) == 1, "ultralytics BaseMixTransform.get_params no longer applies .pre_transform to partners"
    assert pre_transform(LetterBox()) is None


class Painted:
    """The dataset's samples with image i painted one grey level, so a mosaic shows which tile went where."""

    def __init__(self, dataset):
        self.dataset, self.cache, self.buffer = dataset, None, []

    def __len__(self):
        return len(self.dataset)

    def get_image_and_label(self, i):
        labels = self.dataset.get_image_and_label(i)
        labels["img"] = np.full_like(labels["img"], 10 + 20 * (i % 5))
        return labels


def test_mosaic_draws_from_the_whole_dataset_when_its_buffer_is_off(dataset):
    """disable_mosaic_buffer writes `Mosaic.buffer_enabled`, get_indexes' switch from the loader's buffer (here
    empty) to the whole dataset."""
    mosaic = Mosaic(Painted(dataset), imgsz=TEST_IMGSZ, p=1.0, n=4)
    assert isinstance(getattr(mosaic, "buffer_enabled", None), bool), "ultralytics Mosaic no longer has .buffer_enabled"
    disable_mosaic_buffer(mosaic)
    for _ in range(5):
        indexes = mosaic.get_indexes()  # raises on the empty buffer if buffer_enabled still chose it
        assert len(indexes) == 3 and all(0 <= i < len(dataset) for i in indexes)


@pytest.mark.parametrize("n", [4, 9])
def test_mosaic_tiles_place_each_tile_where_ultralytics_painted_it(dataset, n):
    """mosaic_tiles reads `params["layout"]` (items' "labels_patch", "padw", "padh"), `Mosaic.n` and `Mosaic.border`:
    each tile, moved by its (dx, dy), lies where the mosaic shows its grey level."""
    painted = Painted(dataset)
    mosaic = recording(Mosaic)(painted, imgsz=TEST_IMGSZ, p=1.0, n=n)
    assert getattr(mosaic, "n", None) == n, "ultralytics Mosaic no longer has .n (4 or 9 tiles)"
    border = getattr(mosaic, "border", None)
    assert isinstance(border, tuple) and len(border) == 2, "ultralytics Mosaic no longer has .border (x, y)"
    disable_mosaic_buffer(mosaic)
    result = mosaic(painted.get_image_and_label(0))
    out, params = result["img"], mosaic.seen_params
    assert isinstance(params.get("layout"), list) and len(params["layout"]) == n, \
        "ultralytics Mosaic.get_params no longer returns params['layout'] (one item per tile)"
    for key in ("labels_patch", "padw", "padh"):
        assert all(key in item for item in params["layout"]), f"ultralytics Mosaic params['layout'] items lost {key!r}"
    assert out.shape[:2] == (2 * TEST_IMGSZ, 2 * TEST_IMGSZ)
    tiles = mosaic_tiles(mosaic, params)
    shown = 0
    for patch, dx, dy in tiles:
        image = mosaic.seen_labels["img"] if patch is result else patch["img"]  # the primary's labels: now the mosaic
        h, w = image.shape[:2]
        level = image[0, 0, 0]
        y0, y1, x0, x1 = max(dy, 0), min(dy + h, out.shape[0]), max(dx, 0), min(dx + w, out.shape[1])
        if y0 >= y1 or x0 >= x1:
            continue  # a 9-mosaic tile outside the centre crop
        region = out[y0:y1, x0:x1, 0]
        if n == 4:
            assert (region == level).all(), f"tile moved by ({dx}, {dy}) is not where Mosaic painted it"
        else:
            assert region[(y1 - y0) // 2, (x1 - x0) // 2] == level, f"tile moved by ({dx}, {dy}) is not where shown"
        shown += 1
    assert shown >= 1


def test_affine_matrix_is_the_warp_ultralytics_applied(dataset):
    """affine_matrix reads `params["M"]` of RandomPerspective: cv2.warpAffine of the input by it is the output."""
    affine = recording(RandomPerspective)(degrees=10.0, translate=0.1, scale=0.5, shear=2.0,
                                          size=(TEST_IMGSZ, TEST_IMGSZ))
    labels = sample(dataset, 2, TEST_IMGSZ)
    image = labels["img"].copy()
    out = affine(labels)["img"]
    assert "M" in affine.seen_params, "ultralytics RandomPerspective.get_params no longer returns params['M']"
    m = affine_matrix(affine.seen_params)
    assert m.shape == (3, 3), f"ultralytics RandomPerspective params['M'] is {m.shape}, not the 3x3 matrix"
    expected = cv2.warpAffine(image, m[:2], dsize=(TEST_IMGSZ, TEST_IMGSZ), borderValue=(114, 114, 114))
    np.testing.assert_array_equal(out, expected, err_msg="params['M'] is not the warp RandomPerspective applied")


def test_mixup_partner_and_ratio_make_the_blend(dataset):
    """mix_partner reads `labels["mix_labels"][0]` inside apply_image, mixup_ratio `params["r"]`: the output is
    r x image + (1 - r) x partner."""
    mixup = recording(MixUp)(dataset, pre_transform=LetterBox(new_shape=(TEST_IMGSZ, TEST_IMGSZ)), p=1.0)
    labels = sample(dataset, 3, TEST_IMGSZ)
    image = labels["img"].copy()
    out = mixup(labels)["img"]
    assert "mix_labels" in mixup.seen_labels, "ultralytics MixUp no longer hands apply_image labels['mix_labels']"
    assert "r" in mixup.seen_params, "ultralytics MixUp.get_params no longer returns params['r']"
    partner, r = mix_partner(mixup.seen_labels)["img"], mixup_ratio(mixup.seen_params)
    assert 0.0 < r < 1.0
    expected = (image * r + partner * (1 - r)).astype(np.uint8)
    assert np.abs(out.astype(int) - expected).max() <= 1, "r x image + (1 - r) x mix_labels[0] is not MixUp's blend"


@pytest.mark.parametrize("direction,p", [("horizontal", 1.0), ("vertical", 1.0), ("horizontal", 0.0)])
def test_flip_direction_says_what_random_flip_did(dataset, direction, p):
    """flip_direction reads `params["flip"]` and `params["direction"]` of RandomFlip."""
    flip = recording(RandomFlip)(p=p, direction=direction)
    labels = sample(dataset, 4)
    image = labels["img"].copy()
    out = flip(labels)["img"]
    for key in ("flip", "direction"):
        assert key in flip.seen_params, f"ultralytics RandomFlip.get_params no longer returns params[{key!r}]"
    got = flip_direction(flip.seen_params)
    if p == 0.0:
        assert got is None and (out == image).all()
    else:
        assert got == direction
        np.testing.assert_array_equal(out, np.fliplr(image) if direction == "horizontal" else np.flipud(image))


def test_letterbox_placement_is_where_the_resized_image_went(dataset):
    """letterbox_placement reads `params["new_unpad"]` (w, h), `params["left"]` and `params["top"]` of LetterBox."""
    letterbox = recording(LetterBox)(new_shape=(TEST_IMGSZ + 16, TEST_IMGSZ + 16), scaleup=False, center=True)
    labels = sample(dataset, 5)
    image = labels["img"].copy()
    out = letterbox(labels)["img"]
    for key in ("new_unpad", "left", "top"):
        assert key in letterbox.seen_params, f"ultralytics LetterBox.get_params no longer returns params[{key!r}]"
    (w, h), left, top = letterbox_placement(letterbox.seen_params)
    resized = image if (w, h) == image.shape[1::-1] else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out[top:top + h, left:left + w], resized,
                                  err_msg="the image is not at (left, top) with size new_unpad")
    assert (out[:top] == 114).all() and (out[:, :left] == 114).all()


# ------------------------------------------------------------------------------------------ datasets
def _cfg(voc_yaml, **overrides):
    return get_cfg(overrides={"imgsz": TEST_IMGSZ, "data": str(voc_yaml), **overrides})


def test_build_yolo_dataset_makes_its_dataset_through_the_name_yolodataset():
    assert "YOLODataset" in build_yolo_dataset.__code__.co_names, \
        "ultralytics' build_yolo_dataset no longer calls the module-global YOLODataset (dataset_arguments)"
    build = ultralytics_attr("ultralytics.data.build", "build_yolo_dataset")
    assert build is build_yolo_dataset


@pytest.mark.parametrize("mode", ["train", "val"])
def test_dataset_arguments_make_the_dataset_build_yolo_dataset_makes(voc_yaml, mode):
    """A YOLODataset made with dataset_arguments is the one ultralytics' build_yolo_dataset makes."""
    cfg, data = _cfg(voc_yaml, fraction=0.5), check_det_dataset(str(voc_yaml))
    kwargs = dataset_arguments(cfg, data[mode], 4, data, mode, False, 32)
    for key in ("img_path", "imgsz", "batch_size", "augment", "hyp", "rect", "stride", "pad", "data", "fraction"):
        assert key in kwargs, f"ultralytics' build_yolo_dataset no longer passes {key}= to YOLODataset"
    ours, theirs = YOLODataset(**kwargs), build_yolo_dataset(cfg, data[mode], 4, data, mode=mode, stride=32)
    assert type(theirs) is YOLODataset
    for attr in ("im_files", "imgsz", "augment", "rect", "stride", "pad", "batch_size", "fraction"):
        assert getattr(ours, attr) == getattr(theirs, attr), f"{attr}: {getattr(ours, attr)} != {getattr(theirs, attr)}"
    assert [type(t) for t in ours.transforms.transforms] == [type(t) for t in theirs.transforms.transforms]


def test_dataset_arguments_refuse_the_tasks_of_other_dataset_classes(voc_yaml):
    """Every task other than OTHER_DATASET_TASKS makes a YOLODataset in build_yolo_dataset."""
    tasks = ultralytics_attr("ultralytics.cfg", "TASKS")
    data = check_det_dataset(str(voc_yaml))
    for task in tasks:
        cfg = _cfg(voc_yaml, task=task)
        if task in OTHER_DATASET_TASKS:
            with pytest.raises(TypeError):
                dataset_arguments(cfg, data["train"], 4, data)
        else:
            assert dataset_arguments(cfg, data["train"], 4, data)["task"] == task, \
                f"ultralytics' build_yolo_dataset makes another class than YOLODataset for task={task}"


def test_loaded_shape_is_the_loaded_image_s(dataset):
    """loaded_shape reads `label["resized_shape"]` of BaseDataset.get_image_and_label."""
    label = dataset.get_image_and_label(0)
    assert "resized_shape" in label, "ultralytics BaseDataset.get_image_and_label no longer sets 'resized_shape'"
    assert loaded_shape(label) == label["img"].shape[:2] and max(loaded_shape(label)) == TEST_IMGSZ


# ------------------------------------------------------------------------------------------ the criterion
def _labels() -> dict:
    return {"batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[1.0], [3.0], [0.0]]),
            "bboxes": torch.tensor([[0.4, 0.5, 0.3, 0.4], [0.7, 0.3, 0.2, 0.2], [0.5, 0.5, 0.6, 0.5]])}


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26n.yaml"])
def test_the_criterion_is_the_models_own_and_its_gains_are_set(cfg):
    """model_criterion (`model.criterion`, `model.init_criterion()`, `model.args`), detection_loss (the first of
    what the criterion returns), raw_predictions (an eval forward's (decoded, raw)), set_loss_gains and
    criterion_gains (`hyp`, of each branch of an end-to-end criterion)."""
    from atcache.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=20, verbose=False)
    crit = model_criterion(model)
    assert getattr(model, "criterion", None) is crit, "model_criterion no longer keeps the criterion on .criterion"
    x = torch.rand(2, 3, TEST_IMGSZ, TEST_IMGSZ)
    model.train()
    preds = model(x)
    loss = detection_loss(crit, preds, _labels())
    assert loss.shape == (3,), f"the criterion's loss is {tuple(loss.shape)}, not (box, cls, dfl)"
    total, _ = model.loss(_labels(), preds)
    assert model.criterion is crit, "ultralytics BaseModel.loss replaced .criterion"
    torch.testing.assert_close(total, loss)
    model.eval()
    with torch.no_grad():
        eval_preds = model(x)
    assert isinstance(eval_preds, tuple), "an eval forward no longer returns (decoded, raw)"
    torch.testing.assert_close(detection_loss(crit, raw_predictions(eval_preds), _labels()),
                               detection_loss(crit, eval_preds, _labels()))
    set_loss_gains(crit, {"box": 0.0, "dfl": 0.0, "cls": 2.0})
    assert criterion_gains(crit) == {"box": 0.0, "cls": 2.0, "dfl": 0.0}
    with torch.no_grad():
        gained = detection_loss(crit, eval_preds, _labels())
    assert gained[0] == 0 and gained[2] == 0 and gained[1] > 0, \
        f"the criterion ignores the gains set on .hyp ({type(crit).__name__}, ultralytics {ultralytics_version()})"
    with pytest.raises(ValueError):
        set_loss_gains(crit, {"iou": 1.0})
