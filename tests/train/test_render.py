"""The batched torch renderer against the numpy reference renderer: the same targets within 1e-4 per cell."""

import numpy as np
import pytest
import torch

from atcache.train.views import Blend, Canvas, Placed, Source, flip_matrix, translation, warp
from atcache.train.render import BatchRenderer, collate_pieces, flatten
from atcache.cache.format import LETTERBOX_COLUMNS, LetterboxTable
from helpers import fake_spec, random_chunk, seed_layers
from atcache.train.targets import CacheTargets

from helpers import TEST_LAYERS, target_dataset, traced_views

IMGSZ = 128


def synthetic_targets(n=12, dtype="float16", seed=0) -> CacheTargets:
    """A cache in RAM with smooth random maps and a real letterbox for rows of random aspect ratios."""
    from atcache.cache.format import encode_maps

    rng = np.random.default_rng(seed)
    spec = fake_spec(seed_layers(IMGSZ), n_rows=n, chunk_rows=n, imgsz=IMGSZ)
    chunk = random_chunk(spec, 0, n, rng, smooth=True)
    shapes = [(IMGSZ, int(rng.integers(40, IMGSZ + 1))) if i % 2 else (int(rng.integers(40, IMGSZ + 1)), IMGSZ)
              for i in range(n)]
    table = np.array([[h, w, h, w, (IMGSZ - h) // 2, (IMGSZ - w) // 2, 1.0] for h, w in shapes], dtype=np.float32)
    maps, scales = {}, {}
    for i, m in chunk.maps.items():
        maps[i], scales[i] = encode_maps(m, dtype)
    targets = CacheTargets(spec=spec, layers=tuple(chunk.maps), maps=maps, norms=chunk.norms,
                           letterbox=LetterboxTable(table, LETTERBOX_COLUMNS), files=np.array([f"{i}.jpg" for i in range(n)]),
                           done=np.ones(n, bool), grey={i: 0.01 * (k + 1) for k, i in enumerate(chunk.maps)},
                           scales=scales if dtype == "uint8" else None)
    return targets, shapes


def _source(rng, shapes):
    row = int(rng.integers(len(shapes)))
    return Source(row, shapes[row])


def _perspective(rng, shape, out=(IMGSZ, IMGSZ)):
    """A random affine + perspective matrix from a canvas of `shape` onto `out`, sometimes shrinking (uncovered cells)."""
    s = rng.uniform(0.4, 1.2) * out[0] / shape[0]
    a = rng.uniform(-0.5, 0.5)
    m = np.array([[s * np.cos(a), -s * np.sin(a), 0], [s * np.sin(a), s * np.cos(a), 0], [0, 0, 1.0]])
    m[2, :2] = rng.uniform(-1e-3, 1e-3, 2)
    m[:2, 2] = rng.uniform(-0.3, 0.6, 2) * out[0]
    return m


def _mosaic(rng, shapes, n):
    side = 2 * IMGSZ
    tiles = tuple(Placed(_source(rng, shapes), translation(*rng.integers(-IMGSZ // 2, side - 20, 2)))
                  for _ in range(n))
    return Canvas((side, side), tiles, "mosaic")


def random_view(rng, shapes):
    """Mosaic 4 or 9 / letterbox, then affine-perspective, MixUp, flips: the shapes ultralytics' pipelines make."""
    kind = rng.integers(3)
    if kind == 0:
        src = _source(rng, shapes)
        top, left = (IMGSZ - src.shape[0]) // 2, (IMGSZ - src.shape[1]) // 2
        base = warp(src, translation(left, top), (IMGSZ, IMGSZ), "letterbox")
    else:
        base = _mosaic(rng, shapes, 4 if kind == 1 else 9)
    view = warp(base, _perspective(rng, base.shape), (IMGSZ, IMGSZ), "affine")
    if rng.random() < 0.5:
        other = warp(_mosaic(rng, shapes, 4), _perspective(rng, (2 * IMGSZ, 2 * IMGSZ)), (IMGSZ, IMGSZ), "affine")
        r = float(rng.beta(32, 32))
        view = Blend((IMGSZ, IMGSZ), ((view, r), (other, 1 - r)))
    for direction in ("horizontal", "vertical"):
        if rng.random() < 0.5:
            view = warp(view, flip_matrix((IMGSZ, IMGSZ), direction), (IMGSZ, IMGSZ), "flip")
    return view


def renderer_for(targets: CacheTargets) -> BatchRenderer:
    return targets.batch_renderer("cpu")


def render_both(targets, views):
    reference = [targets.warped(v) for v in views]
    pieces = collate_pieces([flatten(v, targets.pad_of) for v in views])
    batched = renderer_for(targets).render(pieces)
    return reference, batched


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_batched_renderer_equals_the_numpy_renderer_on_random_views(dtype):
    targets, shapes = synthetic_targets(dtype=dtype)
    rng = np.random.default_rng(1)
    views = [random_view(rng, shapes) for _ in range(48)]
    reference, batched = render_both(targets, views)
    worst = 0.0
    for k, layer in enumerate(targets.layers):
        got = batched[k].numpy()
        want = np.stack([r[k] for r in reference])
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst < 1e-4
    # the views exercised what they should: MixUp, perspective, and cells no image covers (grey / borrowed)
    assert any(isinstance(v.children[0].view, Blend) if isinstance(v, Canvas) else isinstance(v, Blend) for v in views)


def test_uncovered_cells_take_the_grey_energy():
    """A source shrunk into one corner: cells beyond the cached grid take the layer's grey energy."""
    targets, shapes = synthetic_targets()
    view = warp(Source(0, shapes[0]), np.diag([0.25, 0.25, 1.0]), (IMGSZ, IMGSZ))
    reference, batched = render_both(targets, [view])
    for k in range(len(targets.layers)):
        e = batched[k][0].numpy()
        np.testing.assert_allclose(e, reference[0][k], atol=1e-5)
        far = e[e.shape[0] // 2:, e.shape[1] // 2:]
        assert np.allclose(far, far[0, 0]) and far[0, 0] > 0 and not np.isclose(e[0, 0], far[0, 0])


def test_tracked_pipeline_views_render_the_same(voc_yaml, built_cache):
    """Views recorded through ultralytics' own transforms (mosaic, affine, mixup, flips) on a teacher's cache."""
    ds = target_dataset(voc_yaml, built_cache, mixup=0.5, degrees=10.0, perspective=0.0005)
    views = [v for _, v in traced_views(ds, 16)]
    reference, batched = render_both(ds.at_cache, views)
    for k in range(len(TEST_LAYERS)):
        np.testing.assert_allclose(batched[k].numpy(), np.stack([r[k] for r in reference]), atol=1e-4)


def test_a_blend_inside_a_multi_view_canvas_is_refused():
    from atcache.errors import AtcacheError

    targets, shapes = synthetic_targets()
    blend = Blend((IMGSZ, IMGSZ), ((Source(0, shapes[0]), 0.5), (Source(1, shapes[1]), 0.5)))
    view = Canvas((IMGSZ, IMGSZ), (Placed(blend, np.eye(3)), Placed(Source(2, shapes[2]), np.eye(3))))
    with pytest.raises(AtcacheError, match="MixUp under a canvas"):
        flatten(view, targets.pad_of)


def test_renderer_holds_uint8_maps_as_uint8():
    f16, _ = synthetic_targets(dtype="float16")
    u8, _ = synthetic_targets(dtype="uint8")
    a, b = renderer_for(f16), renderer_for(u8)
    assert all(t.dtype == torch.uint8 for t in b.maps.values())
    assert b.nbytes() < 0.6 * a.nbytes()


def test_clips_that_change_nothing_are_left_out():
    """A flip of the whole image and an affine output inside its mosaic canvas need no clipping; one that reaches
    beyond the canvas keeps its clip."""
    targets, shapes = synthetic_targets()
    tile = Placed(Source(0, shapes[0]), translation(10, 10))
    mosaic = Canvas((2 * IMGSZ, 2 * IMGSZ), (tile,), "mosaic")
    inside = warp(mosaic, translation(-IMGSZ / 2, -IMGSZ / 2), (IMGSZ, IMGSZ))
    flipped = warp(inside, flip_matrix((IMGSZ, IMGSZ), "horizontal"), (IMGSZ, IMGSZ))
    assert flatten(flipped, targets.pad_of).clips.shape[1] == 0
    beyond = warp(mosaic, translation(-IMGSZ * 1.5, 0), (IMGSZ, IMGSZ))  # the right half lies past the canvas
    assert flatten(beyond, targets.pad_of).clips.shape[1] == 1
    reference, batched = render_both(targets, [flipped, beyond])
    for k in range(len(targets.layers)):
        np.testing.assert_allclose(batched[k].numpy(), np.stack([r[k] for r in reference]), atol=1e-4)
