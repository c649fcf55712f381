"""View trees through the warp renderer (render.py) on hand-made cached maps: exact on stride-aligned moves, nothing
where no source covers a cell and no cached grid reaches it, several strides in one pass, and views that follow
OpenCV's resize and warps. Every target is renormalised: expected maps are compared as unit maps."""

import cv2
import numpy as np
import pytest

from atcache.train.render import BatchRenderer, collate_pieces, flatten
from atcache.train.views import Blend, Canvas, Placed, Source, flip_matrix, resize_matrix, translation, warp

STRIDE = 8
EXACT = dict(atol=1e-7, rtol=0)  # exact up to the float32 output of a unit map


def render(view, maps, strides=(STRIDE,), pad=(0.0, 0.0), grey=0.0) -> list[np.ndarray]:
    """Per layer the view's target, rendered from `maps` (per layer, (rows, H, W), held as float16) at `strides`, every
    row letterboxed at `pad` (top, left): the cached grid of a row is the source image itself at (0, 0)."""
    layers = range(len(strides))
    renderer = BatchRenderer({i: np.asarray(maps[i], np.float16) for i in layers},
                             {i: np.ones(len(maps[i]), np.float32) for i in layers}, None,
                             {i: s for i, s in zip(layers, strides)}, {i: grey for i in layers}, eps=0.0)
    rendered = renderer.render(collate_pieces([flatten(view, lambda row: pad)]))
    return [t[0].double().numpy() for t in rendered]


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a)


@pytest.fixture
def grids():
    """Four 8x8 maps (64x64 sources at stride 8) of values float16 holds exactly."""
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(26, 282, (8, 8)) / 256 for _ in range(4)])


def test_identity_render_is_the_map(grids):
    np.testing.assert_allclose(render(Source(0, (64, 64)), [grids])[0], unit(grids[0]), **EXACT)


@pytest.mark.parametrize("direction,axis", [("horizontal", 1), ("vertical", 0)])
def test_flip_is_the_flipped_map_exactly(grids, direction, axis):
    view = warp(Source(0, (64, 64)), flip_matrix((64, 64), direction), (64, 64))
    np.testing.assert_allclose(render(view, [grids])[0], unit(np.flip(grids[0], axis=axis)), **EXACT)


def test_translation_by_whole_cells_shifts_the_map_and_zeros_the_rest(grids):
    view = warp(Source(0, (64, 64)), translation(2 * STRIDE, -1 * STRIDE), (64, 64))
    expected = np.zeros((8, 8))
    expected[:7, 2:] = grids[0][1:, :6]
    np.testing.assert_allclose(render(view, [grids])[0], unit(expected), **EXACT)


def test_four_tile_mosaic_is_the_composite_of_its_tiles(grids):
    # a 128x128 canvas cut at (xc, yc) = (56, 72): tile i is source i placed so that it ends/starts at the cut
    xc, yc = 56, 72
    offsets = [(xc - 64, yc - 64), (xc, yc - 64), (xc - 64, yc), (xc, yc)]
    view = Canvas((128, 128), tuple(Placed(Source(i, (64, 64)), translation(dx, dy)) for i, (dx, dy) in enumerate(offsets)))
    expected = np.zeros((16, 16))
    for i, (dx, dy) in enumerate(offsets):
        cy, cx = dy // STRIDE, dx // STRIDE
        for r in range(8):
            for c in range(8):
                if 0 <= cy + r < 16 and 0 <= cx + c < 16:
                    expected[cy + r, cx + c] = grids[i][r, c]
    np.testing.assert_allclose(render(view, [grids])[0], unit(expected), **EXACT)


def test_cells_outside_every_source_are_zero(grids):
    """A 32x32 source whose cached grid is its own 4x4 cells: beyond it nothing is known, and the grey energy is 0."""
    view = Canvas((128, 128), (Placed(Source(0, (32, 32)), translation(64, 64)),))
    out = render(view, [grids[:, :4, :4]])[0]
    assert np.count_nonzero(out) == 16 and np.all(out[8:12, 8:12] > 0)
    assert np.all(out[:8] == 0) and np.all(out[12:] == 0) and np.all(out[:, :8] == 0) and np.all(out[:, 12:] == 0)
    np.testing.assert_allclose(out[8:12, 8:12], unit(grids[0][:4, :4]), **EXACT)


def test_later_tiles_cover_earlier_ones(grids):
    view = Canvas((64, 64), (Placed(Source(0, (64, 64)), np.eye(3)), Placed(Source(1, (64, 64)), translation(32, 0))))
    expected = np.concatenate([grids[0][:, :4], grids[1][:, :4]], axis=1)
    np.testing.assert_allclose(render(view, [grids])[0], unit(expected), **EXACT)


def test_blend_mixes_by_weight(grids):
    a, b = Source(0, (64, 64)), Source(1, (64, 64))
    out = render(Blend((64, 64), ((a, 0.3), (b, 0.7))), [grids])[0]
    np.testing.assert_allclose(out, unit(0.3 * grids[0] + 0.7 * grids[1]), atol=1e-6, rtol=0)


def test_perspective_matrices_follow_opencv():
    """A point OpenCV's perspectiveTransform moves by m is carried back to where it was by the flattened view."""
    m = np.array([[1.1, 0.2, 5.0], [-0.1, 0.9, 3.0], [1e-3, -2e-3, 1.0]])
    xy = np.random.default_rng(1).random((50, 2)) * 60
    forward = cv2.perspectiveTransform(xy[None].astype(np.float64), m)[0]
    back = flatten(warp(Source(0, (64, 64)), m, (64, 64)), lambda row: (0.0, 0.0)).to_source[0]
    q = np.hstack([forward, np.ones((50, 1))]) @ back.T
    np.testing.assert_allclose(q[:, :2] / q[:, 2:], xy, atol=1e-9)


def test_resize_and_warp_reproduce_opencv_images():
    """An image rendered through the view at stride 1 equals OpenCV's own resize / warpAffine of it, up to the scale
    the renormalisation sets (one factor, fitted)."""
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.random((40, 60)).astype(np.float32), (7, 7), 2).astype(np.float16).astype(np.float32)
    src = Source(0, (40, 60))

    def scaled(out, want, region):  # out scaled to want over region (least squares)
        k = (out[region] * want[region]).sum() / (out[region] ** 2).sum()
        return k * out[region]

    resized = cv2.resize(img, (90, 60), interpolation=cv2.INTER_LINEAR)
    (out,) = render(warp(src, resize_matrix((40, 60), (60, 90)), (60, 90)), [img[None]], strides=(1,))
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(scaled(out, resized, inner), resized[inner], atol=1e-5)
    m = cv2.getRotationMatrix2D((30, 20), 10, 1.2)
    warped = cv2.warpAffine(img, m, (60, 40), flags=cv2.INTER_LINEAR, borderValue=0)
    (out,) = render(warp(src, np.vstack([m, [0, 0, 1]]), (40, 60)), [img[None]], strides=(1,))
    inner = (slice(10, 30), slice(15, 45))
    np.testing.assert_allclose(scaled(out, warped, inner), warped[inner], atol=2e-3)  # OpenCV: 1/32-pixel steps


def test_layers_of_several_strides_render_as_each_alone():
    """All layers in one pass (strides 8, 4, 16, 8, as training renders them) == each layer rendered by itself."""
    rng = np.random.default_rng(1)
    strides = (8, 4, 16, 8)
    maps = [rng.integers(1, 1024, (2, 64 // s, 64 // s)) / 256 for s in strides]
    tiles = Canvas((96, 96), (Placed(Source(0, (64, 64)), translation(-20, 8)), Placed(Source(1, (64, 64)), translation(40, 36))))
    theta = np.array([[0.9, 0.2, 5.0], [-0.15, 1.1, -7.0], [0.0005, 0.0003, 1.0]])
    view = Blend((96, 96), ((warp(tiles, theta, (96, 96)), 0.6), (warp(Source(1, (64, 64)), flip_matrix((64, 64), "horizontal"), (96, 96)), 0.4)))
    together = render(view, maps, strides)
    for k, s in enumerate(strides):
        assert together[k].shape == (96 // s, 96 // s)
        np.testing.assert_array_equal(together[k], render(view, [maps[k]], (s,))[0])


def test_uncovered_cells_borrow_from_the_source_around_them_then_fill():
    """A 32x32 image letterboxed with 16 px of padding in its 64x64 cached square: a cell no image covers takes what
    the cache holds around the image (its letterbox padding), and the layer's grey energy where the cache ends."""
    view = Canvas((128, 128), (Placed(Source(0, (32, 32)), translation(64, 64)),))
    cached = np.full((1, 8, 8), 2.0)  # the padding's cells
    cached[0, 2:6, 2:6] = 5.0  # the image's cells
    (out,) = render(view, [cached], pad=(16.0, 16.0), grey=1.0)
    expected = np.ones((16, 16))  # grey beyond the cached square
    expected[6:14, 6:14] = 2.0  # the 16 px ring around the image
    expected[8:12, 8:12] = 5.0  # the image
    np.testing.assert_allclose(out, unit(expected), **EXACT)
