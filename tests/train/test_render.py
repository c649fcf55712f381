"""The warp renderer (render.BatchRenderer: training's, the streamed cache's and fidelity's), checked rule by rule:
a letterboxed row renders its stored map, cells sample the cached energy bilinearly through the view's matrices, the
last covering piece wins and uncovered cells borrow or take the grey energy, blends mix by weight, flips mirror, and a
view renders the same alone as in any batch. `helpers.spec_targets` states the rules cell by cell (the specification
the renderer is held to within 1e-5, on random views and on views recorded through ultralytics' own transforms)."""

import numpy as np
import pytest
import torch

from atcache.train.views import Blend, Canvas, Placed, Source, flip_matrix, translation, warp
from atcache.train.render import BatchRenderer, collate_pieces, flatten, render_views
from atcache.cache.format import LETTERBOX_COLUMNS, LetterboxTable
from helpers import fake_spec, random_chunk, seed_layers
from atcache.train.targets import CacheTargets

from helpers import spec_targets, target_dataset, traced_views

IMGSZ = 128
TOLERANCE = 1e-5  # per cell of a unit-norm target: float32 output of a float64 computation


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


def letterboxed(targets, row, shapes) -> Canvas:
    """Row `row` as the teacher saw it: its resized image placed at its letterbox pad."""
    top, left = targets.pad_of(row)
    return warp(Source(row, shapes[row]), translation(left, top), (IMGSZ, IMGSZ), "letterbox")


def random_view(rng, shapes, flips=True):
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
        if flips and rng.random() < 0.5:
            view = warp(view, flip_matrix((IMGSZ, IMGSZ), direction), (IMGSZ, IMGSZ), "flip")
    return view


def renderer_for(targets: CacheTargets) -> BatchRenderer:
    return targets.batch_renderer("cpu")


def render(targets, views) -> list[np.ndarray]:
    """Per layer (B, h/s, w/s): the views rendered together, as a training batch."""
    pieces = collate_pieces([flatten(v, targets.pad_of) for v in views])
    return [t.numpy() for t in renderer_for(targets).render(pieces)]


def assert_spec(targets, views, rendered=None, tolerance=TOLERANCE) -> None:
    rendered = render(targets, views) if rendered is None else rendered
    for n, view in enumerate(views):
        for k, want in enumerate(spec_targets(targets, flatten(view, targets.pad_of))):
            got = rendered[k][n]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=tolerance, rtol=0, err_msg=f"view {n} layer {targets.layers[k]}")


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_a_letterboxed_row_renders_its_stored_map(dtype):
    """The view of the teacher's own input (no augmentation): every cell centre lands on a cached cell, so the
    target is the stored map A (unit norm) exactly, up to float16 storage."""
    targets, shapes = synthetic_targets(dtype=dtype)
    rows = range(len(shapes))
    rendered = render(targets, [letterboxed(targets, r, shapes) for r in rows])
    for k, layer in enumerate(targets.layers):
        for n, row in enumerate(rows):
            stored = targets.map_row(layer, row).astype(np.float64)
            np.testing.assert_allclose(rendered[k][n], stored / np.linalg.norm(stored), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_random_views_follow_the_rules(dtype):
    """Mosaics of 4 and 9 tiles, affine-perspective warps, MixUp and flips, 48 views in one batch."""
    targets, shapes = synthetic_targets(dtype=dtype)
    rng = np.random.default_rng(1)
    views = [random_view(rng, shapes) for _ in range(48)]
    assert_spec(targets, views)
    # the views exercised what they should: MixUp, perspective, and cells no image covers (grey / borrowed)
    assert any(isinstance(v.children[0].view, Blend) if isinstance(v, Canvas) else isinstance(v, Blend) for v in views)


def test_uncovered_cells_take_the_grey_energy():
    """A source shrunk into one corner: cells beyond the cached grid take the layer's grey energy."""
    targets, shapes = synthetic_targets()
    view = warp(Source(0, shapes[0]), np.diag([0.25, 0.25, 1.0]), (IMGSZ, IMGSZ))
    rendered = render(targets, [view])
    assert_spec(targets, [view], rendered)
    for k in range(len(targets.layers)):
        e = rendered[k][0]
        far = e[e.shape[0] // 2:, e.shape[1] // 2:]
        assert np.allclose(far, far[0, 0]) and far[0, 0] > 0 and not np.isclose(e[0, 0], far[0, 0])


def test_the_last_covering_tile_wins():
    """Two tiles overlapping on a mosaic canvas: wherever the second covers a cell, the cell is the second's (the
    same energy as with the second tile alone, up to the renormalisation)."""
    targets, shapes = synthetic_targets()
    a, b = Placed(Source(0, shapes[0]), np.eye(3)), Placed(Source(1, shapes[1]), translation(IMGSZ // 2, 0))
    mosaic = Canvas((IMGSZ, IMGSZ), (a, b), "mosaic")
    both, only_b = render(targets, [mosaic]), render(targets, [Canvas((IMGSZ, IMGSZ), (b,), "mosaic")])
    for k, layer in enumerate(targets.layers):
        s = targets.stride(layer)
        centres = np.arange(IMGSZ // s) * s + (s - 1) / 2
        cols = (centres - IMGSZ // 2 >= -0.5) & (centres - IMGSZ // 2 < shapes[1][1] - 0.5)
        rows = centres < shapes[1][0] - 0.5
        ratio = both[k][0][np.ix_(rows, cols)] / only_b[k][0][np.ix_(rows, cols)]
        assert ratio.size and ratio.flat[0] < 1  # tile a's cells share the norm with b's
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    assert_spec(targets, [mosaic], both)


def test_a_blend_mixes_its_parts_by_weight():
    """MixUp of two letterboxed rows: the weighted sum of their energies, renormalised; where one part's image covers
    a cell and the other's does not (letterbox padding), the other adds nothing."""
    targets, shapes = synthetic_targets()
    r, rows = 0.3, (2, 5)
    view = Blend((IMGSZ, IMGSZ), tuple((letterboxed(targets, row, shapes), w) for row, w in zip(rows, (r, 1 - r))))
    rendered = render(targets, [view])
    for k, layer in enumerate(targets.layers):
        s = targets.stride(layer)
        centres = np.arange(IMGSZ // s) * s + (s - 1) / 2
        parts, covers = [], []
        for row, weight in zip(rows, (r, 1 - r)):
            (top, left), (h, w) = targets.pad_of(row), shapes[row]
            inside = lambda c, start, size: (c - start >= -0.5) & (c - start < size - 0.5)  # noqa: E731
            covers.append(inside(centres, top, h)[:, None] & inside(centres, left, w)[None, :])
            parts.append(weight * targets.energy(layer, row).astype(np.float64))
        e = np.where(covers[0] | covers[1], parts[0] * covers[0] + parts[1] * covers[1], parts[0] + parts[1])
        assert (covers[0] != covers[1]).any()  # the two letterboxes differ
        np.testing.assert_allclose(rendered[k][0], e / np.linalg.norm(e), atol=TOLERANCE, rtol=0)


def test_flips_mirror_the_target():
    targets, shapes = synthetic_targets()
    rng = np.random.default_rng(2)
    views = [random_view(rng, shapes, flips=False) for _ in range(16)]
    flipped = [warp(v, flip_matrix((IMGSZ, IMGSZ), d), (IMGSZ, IMGSZ), "flip")
               for v, d in zip(views, ["horizontal", "vertical"] * 8)]
    plain, mirrored = render(targets, views), render(targets, flipped)
    for k in range(len(targets.layers)):
        for n in range(len(views)):
            axis = 1 if n % 2 == 0 else 0
            np.testing.assert_allclose(mirrored[k][n], np.flip(plain[k][n], axis=axis), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_a_view_renders_the_same_alone_and_in_any_batch(dtype):
    """Batches pad pieces and clips to their largest sample: nothing of that reaches a target."""
    targets, shapes = synthetic_targets(dtype=dtype)
    rng = np.random.default_rng(3)
    views = [random_view(rng, shapes) for _ in range(24)]
    together = render(targets, views)
    for n, view in enumerate(views[:8]):
        for k, alone in enumerate(render(targets, [view])):
            np.testing.assert_allclose(together[k][n], alone[0], atol=1e-6, rtol=0)
    for n, single in enumerate(render_views(targets, views[8:12])):  # the per-view entry point: the same renderer
        for k, layer_target in enumerate(single):
            np.testing.assert_array_equal(layer_target, render(targets, views[8:12])[k][n])


def test_tracked_pipeline_views_follow_the_rules(voc_yaml, built_cache):
    """Views recorded through ultralytics' own transforms (mosaic, affine, mixup, flips) on a teacher's cache."""
    ds = target_dataset(voc_yaml, built_cache, mixup=0.5, degrees=10.0, perspective=0.0005)
    views = [v for _, v in traced_views(ds, 16)]
    rendered = render(ds.at_cache, views)
    assert_spec(ds.at_cache, views, rendered, tolerance=1e-4)
    assert all(np.isfinite(layer_targets).all() for layer_targets in rendered)


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
    beyond the canvas keeps its clip, and the cells beyond the canvas take the grey energy."""
    targets, shapes = synthetic_targets()
    tile = Placed(Source(0, shapes[0]), translation(10, 10))
    mosaic = Canvas((2 * IMGSZ, 2 * IMGSZ), (tile,), "mosaic")
    inside = warp(mosaic, translation(-IMGSZ / 2, -IMGSZ / 2), (IMGSZ, IMGSZ))
    flipped = warp(inside, flip_matrix((IMGSZ, IMGSZ), "horizontal"), (IMGSZ, IMGSZ))
    assert flatten(flipped, targets.pad_of).clips.shape[1] == 0
    beyond = warp(mosaic, translation(-IMGSZ * 1.5, 0), (IMGSZ, IMGSZ))  # the right half lies past the canvas
    assert flatten(beyond, targets.pad_of).clips.shape[1] == 1
    rendered = render(targets, [flipped, beyond])
    assert_spec(targets, [flipped, beyond], rendered)
    for k, layer in enumerate(targets.layers):
        right = rendered[k][1][:, rendered[k][1].shape[1] // 2:]
        np.testing.assert_allclose(right, right[0, 0], rtol=1e-6)
