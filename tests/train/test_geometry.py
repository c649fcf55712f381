"""View trees and resampling: exact on stride-aligned moves, zero outside every source, matching OpenCV's warps."""

import cv2
import numpy as np
import pytest

from atcache.train.views import (
    Blend, Canvas, Placed, Source, apply_inverse, bilinear, flip_matrix, render, render_grids, resize_matrix,
    translation, warp,
)

STRIDE = 8


def grid_leaf(grids: dict[int, np.ndarray], stride: int = STRIDE):
    """A source whose pixel (x, y) has the value of its stride-cell (a cached map at stride `stride`, no letterbox)."""
    c = (stride - 1) / 2

    def leaf(source, xy):
        return bilinear(grids[source.row], (xy[:, 0] - c) / stride, (xy[:, 1] - c) / stride)

    return leaf


@pytest.fixture
def grids():
    rng = np.random.default_rng(0)
    return {r: rng.random((8, 8)) + 0.1 for r in range(4)}  # 64x64 sources at stride 8


def test_identity_render_is_the_map(grids):
    np.testing.assert_array_equal(render(Source(0, (64, 64)), STRIDE, grid_leaf(grids)), grids[0])


@pytest.mark.parametrize("direction,axis", [("horizontal", 1), ("vertical", 0)])
def test_flip_is_the_flipped_map_exactly(grids, direction, axis):
    view = warp(Source(0, (64, 64)), flip_matrix((64, 64), direction), (64, 64))
    np.testing.assert_array_equal(render(view, STRIDE, grid_leaf(grids)), np.flip(grids[0], axis=axis))


def test_translation_by_whole_cells_shifts_the_map_and_zeros_the_rest(grids):
    view = warp(Source(0, (64, 64)), translation(2 * STRIDE, -1 * STRIDE), (64, 64))
    out = render(view, STRIDE, grid_leaf(grids))
    expected = np.zeros((8, 8))
    expected[:7, 2:] = grids[0][1:, :6]
    np.testing.assert_array_equal(out, expected)


def test_four_tile_mosaic_is_the_composite_of_its_tiles(grids):
    # a 128x128 canvas cut at (xc, yc) = (56, 72): tile i is source i placed so that it ends/starts at the cut
    xc, yc = 56, 72
    offsets = [(xc - 64, yc - 64), (xc, yc - 64), (xc - 64, yc), (xc, yc)]
    view = Canvas((128, 128), tuple(Placed(Source(i, (64, 64)), translation(dx, dy)) for i, (dx, dy) in enumerate(offsets)))
    out = render(view, STRIDE, grid_leaf(grids))
    expected = np.zeros((16, 16))
    for i, (dx, dy) in enumerate(offsets):
        cy, cx = dy // STRIDE, dx // STRIDE
        for r in range(8):
            for c in range(8):
                if 0 <= cy + r < 16 and 0 <= cx + c < 16:
                    expected[cy + r, cx + c] = grids[i][r, c]
    np.testing.assert_array_equal(out, expected)


def test_cells_outside_every_source_are_zero(grids):
    view = Canvas((128, 128), (Placed(Source(0, (32, 32)), translation(64, 64)),))
    out = render(view, STRIDE, grid_leaf(grids))
    assert np.count_nonzero(out) == 16 and np.all(out[8:12, 8:12] > 0)
    assert np.all(out[:8] == 0) and np.all(out[12:] == 0) and np.all(out[:, :8] == 0) and np.all(out[:, 12:] == 0)


def test_later_tiles_cover_earlier_ones(grids):
    view = Canvas((64, 64), (Placed(Source(0, (64, 64)), np.eye(3)), Placed(Source(1, (64, 64)), translation(32, 0))))
    out = render(view, STRIDE, grid_leaf(grids))
    np.testing.assert_array_equal(out[:, :4], grids[0][:, :4])
    np.testing.assert_array_equal(out[:, 4:], grids[1][:, :4])


def test_blend_mixes_by_weight(grids):
    a, b = Source(0, (64, 64)), Source(1, (64, 64))
    out = render(Blend((64, 64), ((a, 0.3), (b, 0.7))), STRIDE, grid_leaf(grids))
    np.testing.assert_allclose(out, 0.3 * grids[0] + 0.7 * grids[1])


def test_perspective_inverse_matches_opencv():
    m = np.array([[1.1, 0.2, 5.0], [-0.1, 0.9, 3.0], [1e-3, -2e-3, 1.0]])
    xy = np.random.default_rng(1).random((50, 2)) * 60
    forward = cv2.perspectiveTransform(xy[None].astype(np.float64), m)[0]
    np.testing.assert_allclose(apply_inverse(m, forward), xy, atol=1e-9)


def test_resize_and_warp_reproduce_opencv_images():
    """An image resampled through the view equals OpenCV's own resize / warpAffine of it."""
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.random((40, 60)).astype(np.float32), (7, 7), 2)
    leaf = lambda source, xy: bilinear(img.astype(np.float64), xy[:, 0], xy[:, 1])  # noqa: E731
    src = Source(0, (40, 60))
    resized = cv2.resize(img, (90, 60), interpolation=cv2.INTER_LINEAR)
    out = render(warp(src, resize_matrix((40, 60), (60, 90)), (60, 90)), 1, leaf)
    np.testing.assert_allclose(out[1:-1, 1:-1], resized[1:-1, 1:-1], atol=1e-5)
    m = cv2.getRotationMatrix2D((30, 20), 10, 1.2)
    warped = cv2.warpAffine(img, m, (60, 40), flags=cv2.INTER_LINEAR, borderValue=0)
    out = render(warp(src, np.vstack([m, [0, 0, 1]]), (40, 60)), 1, leaf)
    inner = (slice(10, 30), slice(15, 45))
    np.testing.assert_allclose(out[inner], warped[inner], atol=2e-3)  # OpenCV interpolates in 1/32-pixel steps


def test_render_grids_equals_one_render_per_stride():
    """One walk for several strides (how cached targets render all layers) == a render per stride."""
    rng = np.random.default_rng(1)
    maps = {s: {r: rng.random((64 // s, 64 // s)) for r in range(2)} for s in (4, 8, 16)}
    tiles = Canvas((96, 96), (Placed(Source(0, (64, 64)), translation(-20, 8)), Placed(Source(1, (64, 64)), translation(40, 36))))
    theta = np.array([[0.9, 0.2, 5.0], [-0.15, 1.1, -7.0], [0.0005, 0.0003, 1.0]])
    view = Blend((96, 96), ((warp(tiles, theta, (96, 96)), 0.6), (warp(Source(1, (64, 64)), flip_matrix((64, 64), "horizontal"), (96, 96)), 0.4)))
    strides = (8, 4, 16, 8)
    leaves = [grid_leaf(maps[s], s) for s in strides]

    def leaf(source, xy, grid):
        out = np.empty(len(xy))
        for k in np.unique(grid):
            out[grid == k] = leaves[k](source, xy[grid == k])
        return out

    for got, s, single in zip(render_grids(view, strides, leaf), strides, leaves):
        np.testing.assert_array_equal(got, render(view, s, single))


def test_uncovered_cells_borrow_from_the_source_around_them_then_fill():
    """With fill, a cell no image covers takes what the nearest source's leaf gives beyond its image (its letterbox
    padding in the cache), and the fill value where no leaf answers."""
    view = Canvas((128, 128), (Placed(Source(0, (32, 32)), translation(64, 64)),))

    def leaf(source, xy, grid):  # answers within 16 px around the 32x32 image, NaN beyond
        out = np.full(len(xy), 2.0)
        out[(xy < -16).any(1) | (xy > 47).any(1)] = np.nan
        out[((xy >= 0) & (xy < 32)).all(1)] = 5.0
        return out

    (plain,) = render_grids(view, [STRIDE], leaf)
    (filled,) = render_grids(view, [STRIDE], leaf, fill=[-1.0])
    assert np.all(plain[8:12, 8:12] == 5) and np.count_nonzero(plain) == 16
    np.testing.assert_array_equal(filled[8:12, 8:12], plain[8:12, 8:12])
    assert np.all(filled[6:14, 6:14][filled[6:14, 6:14] != 5] == 2.0)  # the 16 px ring around the image
    assert np.all(filled[:6] == -1) and np.all(filled[14:] == -1)
