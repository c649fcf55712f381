"""Cached targets in training: join by path, views recorded through ultralytics' own augmentations, refusals."""

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from atcache.data.splits import letterbox_image, read_image, resize_long_side, split_files
from atcache.errors import AtcacheError
from atcache.train.views import Canvas, Placed, Source, flip_matrix, translation, warp
from helpers import (TEST_IMGSZ, TEST_LAYERS, bilinear_at, build_config, inside_image, target_dataset, through_piece,
                     traced_views)

pytestmark = pytest.mark.release_range  # also run on the oldest ultralytics of the range (CI)


def image_through(pieces, image_of) -> np.ndarray:
    """An augmented image by the rules the warp renderer follows, pixel by pixel: each pixel centre goes through a
    piece's clips and matrix into its source image (`image_of(row)`, (h, w, 3)); in each blend group the last piece
    covering the pixel gives the bilinear sample there, weighted by the group's weight; no piece covering it: 0."""
    h, w = pieces.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    painted = {}
    for k, row in enumerate(pieces.rows):
        clipped, x, y = through_piece(pieces, k, pts)
        image = image_of(int(row))
        value = pieces.weight[k] * np.stack([bilinear_at(image[..., c], x, y) for c in range(3)], -1)
        covers = clipped & inside_image(x, y, pieces.source_shape[k])
        g = int(pieces.group[k])
        painted[g] = np.where(covers[:, None], value, painted.get(g, 0.0))  # the last covering piece wins
    return sum(painted.values()).reshape(h, w, 3)


def test_recorded_views_reproduce_the_augmented_images(voc_yaml, built_cache):
    """Resampling the source images through the recorded view, flattened into the pieces the renderer renders from,
    gives the image ultralytics produced: mosaic, affine (rotation, shear, scale, translation), flips and MixUp all
    tracked. Pixels are taken relative to the grey fill (114), which no source covers (0 there)."""
    random.seed(0)
    np.random.seed(0)
    ds = target_dataset(voc_yaml, built_cache, mosaic=1.0, mixup=0.5, degrees=10, shear=5, translate=0.1, scale=0.5,
                      fliplr=0.5, flipud=0.5, hsv_h=0, hsv_s=0, hsv_v=0)
    split = split_files(voc_yaml, "train")
    files = ds.at_cache.files
    resized = {}

    def image_of(row):
        if row not in resized:
            im = resize_long_side(read_image(split.root / files[row]), TEST_IMGSZ)
            resized[row] = im.astype(np.float64) - 114
        return resized[row]

    kinds = set()
    for img, view in traced_views(ds, 24):
        kinds.add(type(view).__name__)
        pieces = ds.at_cache.pieces(view)
        assert pieces.shape == img.shape[:2]
        rendered = image_through(pieces, image_of) + 114
        diff = np.abs(rendered - img)  # bilinear vs OpenCV's fixed-point warp; edges of warped tiles blend with grey
        assert np.median(diff) <= 1.0 and np.percentile(diff, 95) < 12, (np.median(diff), np.percentile(diff, 95))
    assert {"Canvas", "Blend"} <= kinds  # both plain and MixUp samples were checked


def test_flipped_target_is_the_flipped_unflipped_target(voc_yaml, built_cache):
    ds = target_dataset(voc_yaml, built_cache)
    cache, row = ds.at_cache, 3
    box = cache.letterbox.row(row)
    top, left = box["pad_top"], box["pad_left"]
    h, w = int(box["h"]), int(box["w"])
    placed = Canvas((TEST_IMGSZ, TEST_IMGSZ), (Placed(Source(row, (h, w)), translation(left, top)),))
    flipped = warp(placed, flip_matrix((TEST_IMGSZ, TEST_IMGSZ), "horizontal"), (TEST_IMGSZ, TEST_IMGSZ))
    for plain, mirrored, layer in zip(cache.warped(placed), cache.warped(flipped), TEST_LAYERS):
        np.testing.assert_array_equal(mirrored, plain[:, ::-1])
        # cells inside the image are the stored map (up to the renormalisation over the covered cells)
        stored = cache.maps[layer][row].astype(np.float32)
        s = cache.stride(layer)
        inner = np.zeros_like(stored, dtype=bool)
        inner[int(np.ceil(top / s)):int((top + h) // s), int(np.ceil(left / s)):int((left + w) // s)] = True
        if inner.any():
            ratio = plain[inner] / stored[inner]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_static_targets_are_the_stored_maps_of_the_same_image(voc_yaml, built_cache):
    ds = target_dataset(voc_yaml, built_cache, mode="static", hsv_h=0, hsv_s=0, hsv_v=0)
    split = split_files(voc_yaml, "train")
    for i in (0, 5, 11):
        item = ds[i]
        row = ds.at_rows[i]
        assert split.root / ds.at_cache.files[row] == Path(ds.im_files[i]).resolve()
        expected, _ = letterbox_image(read_image(ds.im_files[i]), TEST_IMGSZ)
        np.testing.assert_array_equal(item["img"].numpy(), expected.transpose(2, 0, 1)[::-1])
        for target, layer in zip(item["at_targets"], TEST_LAYERS):
            np.testing.assert_array_equal(target.numpy(), ds.at_cache.maps[layer][row].astype(np.float32))


def test_rows_are_joined_by_path_not_position(voc_yaml, built_cache):
    ds = target_dataset(voc_yaml, built_cache, fraction=0.5)  # a subset: positions no longer line up with rows
    split = split_files(voc_yaml, "train")
    for i, row in enumerate(ds.at_rows):
        assert split.root / ds.at_cache.files[row] == Path(ds.im_files[i]).resolve()


def test_batches_carry_one_target_per_layer(voc_yaml, built_cache):
    from atcache.train.datasets import AtcacheDataset

    ds = target_dataset(voc_yaml, built_cache)
    batch = AtcacheDataset.collate_fn([ds[i] for i in range(3)])
    shapes = [tuple(t.shape) for t in batch["at_targets"]]
    assert shapes == [(3, TEST_IMGSZ // s, TEST_IMGSZ // s) for s in (16, 32, 16, 8, 16, 32)]
    for t in batch["at_targets"]:
        norms = np.linalg.norm(t.numpy().reshape(3, -1), axis=1)
        assert np.all(np.isfinite(norms)) and np.all((np.abs(norms - 1) < 1e-4) | (norms == 0))


def test_untrackable_augmentation_is_refused(voc_yaml, built_cache):
    with pytest.raises(AtcacheError, match="cutmix=0.5 cannot be aligned"):
        target_dataset(voc_yaml, built_cache, cutmix=0.5)


# ---------------------------------------------------------------------- the cache against the run
def check(cache, voc_yaml, layers=TEST_LAYERS, imgsz=TEST_IMGSZ):
    from atcache.train.trainer import check_cache

    return check_cache(cache, layers, imgsz, split_files(voc_yaml, "train"))


def test_matching_cache_passes(voc_yaml, built_cache):
    assert check(built_cache, voc_yaml).imgsz == TEST_IMGSZ


def test_other_imgsz_is_refused(voc_yaml, built_cache):
    with pytest.raises(AtcacheError, match=f"built at imgsz {TEST_IMGSZ} but this run trains at imgsz 96"):
        check(built_cache, voc_yaml, imgsz=96)


def test_missing_layer_is_refused(voc_yaml, built_cache):
    with pytest.raises(AtcacheError, match="layer 4 is not in cache"):
        check(built_cache, voc_yaml, layers=(4, 6))


def test_other_split_is_refused(voc_yaml, teacher_pt, tmp_path):
    from atcache.teacher.pipeline import build_cache

    out = tmp_path / "val.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), split="val", layers=(6,)))
    with pytest.raises(AtcacheError, match="differs from the one cached"):
        check(out, voc_yaml, layers=(6,))


def test_incomplete_cache_is_refused(voc_yaml, built_cache, tmp_path):
    copy = tmp_path / "partial.zarr"
    shutil.copytree(built_cache, copy)
    done = zarr.open_array(str(copy / "done"), mode="r+")
    done[8:16] = False
    with pytest.raises(AtcacheError, match="cache is incomplete: 8 training images.*--resume"):
        check(copy, voc_yaml)


def test_changed_images_are_refused(voc_yaml, built_cache, tmp_path):
    data_copy = tmp_path / "VOC"
    root = split_files(voc_yaml, "train").root
    shutil.copytree(root, data_copy)
    yaml_copy = data_copy / "VOC.yaml"
    yaml_copy.write_text(Path(voc_yaml).read_text().replace(str(root), str(data_copy)))
    victim = data_copy / split_files(yaml_copy, "train").files[0]
    victim.write_bytes(victim.read_bytes() + b"\0" * 10)
    with pytest.raises(AtcacheError, match="edited or replaced"):
        check(built_cache, yaml_copy)


def test_letterbox_columns_are_read_by_name(voc_yaml, built_cache, tmp_path):
    """A store whose letterbox columns are stored in another order (attr `columns` says which) gives the same
    letterbox by name and the same warped targets: nothing reads a column by position."""
    from atcache.cache.store import CacheStore
    from atcache.train.targets import CacheTargets

    copy = tmp_path / "reordered.zarr"
    shutil.copytree(built_cache, copy)
    arr = zarr.open_group(str(copy), mode="r+")["letterbox"]
    columns = list(arr.attrs["columns"])
    order = columns[::-1]
    arr[:] = arr[:][:, [columns.index(c) for c in order]]
    arr.attrs["columns"] = order
    a, b = CacheStore.open(built_cache).letterbox(), CacheStore.open(copy).letterbox()
    assert b.columns == tuple(order) != a.columns
    for c in columns:
        np.testing.assert_array_equal(a[c], b[c])
    views = [view for _, view in traced_views(target_dataset(voc_yaml, built_cache), 6)]
    one, two = CacheTargets.load(built_cache, TEST_LAYERS), CacheTargets.load(copy, TEST_LAYERS)
    for view in views:
        for x, y in zip(one.warped(view), two.warped(view)):
            np.testing.assert_array_equal(x, y)
