"""ultralytics' dataset construction and the dataset internals atcache reads, each behind one named function.

atcache's training dataset (atcache.train.datasets.AtcacheDataset) subclasses YOLODataset through the methods meant
for it (build_transforms, get_image_and_label, close_mosaic, collate_fn) and is built with the arguments ultralytics'
own `build_yolo_dataset` computes (`dataset_arguments`), so it is the dataset ultralytics would build, release by
release. tests/yolo/test_contracts.py asserts each function against the installed ultralytics.
"""

from __future__ import annotations

import types
from typing import Any

# tasks for which build_yolo_dataset makes another class than YOLODataset (8.4.150-8.4.190)
OTHER_DATASET_TASKS = ("depth", "semantic")


def _record(**kwargs) -> dict[str, Any]:
    """Stands in for YOLODataset in dataset_arguments' copy of build_yolo_dataset: the keyword arguments."""
    return kwargs


def dataset_arguments(cfg, img_path, batch: int | None, data: dict, mode: str = "train", rect: bool = False,
                      stride: int = 32) -> dict[str, Any]:
    """The keyword arguments ultralytics' `build_yolo_dataset(cfg, img_path, batch, data, mode, rect, stride)` gives
    the YOLODataset it makes (img_path, imgsz, batch_size, augment, hyp, rect, cache, single_cls, stride, pad, prefix,
    task, classes, data, fraction), as the installed release computes them: a YOLODataset subclass made with them is
    the dataset ultralytics would make. Nothing is built and no module is changed: ultralytics' own function runs, a
    copy of it whose module-global name `YOLODataset` answers with the arguments. Tasks of OTHER_DATASET_TASKS make
    other classes: TypeError.

    Private use: build_yolo_dataset makes a detection dataset by calling the module-global name `YOLODataset` of
    ultralytics.data.build with keyword arguments only, 8.4.150-8.4.190. What it passes differs by release (8.4.150:
    hyp a copy of cfg, a non-train split's fraction looked up by `mode`; 8.4.190: hyp cfg itself, by cfg.split): each
    release's own rule is what this returns, no branch of atcache's."""
    if cfg.task in OTHER_DATASET_TASKS:
        raise TypeError(f"task={cfg.task}: ultralytics' build_yolo_dataset makes another class than YOLODataset")
    from atcache.yolo import build_yolo_dataset

    code = getattr(build_yolo_dataset, "__code__", None)
    if code is None or "YOLODataset" not in code.co_names:
        raise RuntimeError("ultralytics' build_yolo_dataset no longer makes its dataset through the module-global name "
                           "YOLODataset; atcache.yolo.datasets.dataset_arguments must follow it")
    scope = {**build_yolo_dataset.__globals__, "YOLODataset": _record}
    build = types.FunctionType(code, scope, build_yolo_dataset.__name__, build_yolo_dataset.__defaults__,
                               build_yolo_dataset.__closure__)
    build.__kwdefaults__ = build_yolo_dataset.__kwdefaults__
    kwargs = build(cfg, img_path, batch, data, mode=mode, rect=rect, stride=stride)
    if not isinstance(kwargs, dict):
        raise RuntimeError(f"ultralytics' build_yolo_dataset made a {type(kwargs).__name__} for task={cfg.task}, not "
                           "a YOLODataset; atcache.yolo.datasets.dataset_arguments must follow it")
    return kwargs


def loaded_shape(label: dict[str, Any]) -> tuple[int, int]:
    """(h, w) of a sample's image as the dataset loaded it (long side resized to imgsz), before any transform.

    Reads `label["resized_shape"]`, which BaseDataset.get_image_and_label sets from load_image, 8.4.150-8.4.190."""
    h, w = label["resized_shape"]
    return int(h), int(w)
