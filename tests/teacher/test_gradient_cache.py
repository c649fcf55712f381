"""build-cache --gradient: the teacher's input gradient of every row stored beside the maps (grad/direction float16,
grad/norm float32), equal to atcache.attention.gradient computed directly on ultralytics' own letterboxed images and
labels; the maps unchanged; verified, repaired and refused on resume like the other arrays; read with open_cache."""

import shutil

import numpy as np
import pytest
import torch
import zarr

from atcache.attention.gradient import input_gradient, pool_gradient
from atcache.teacher.pipeline import build_cache
from atcache.cache.format import FORMAT_VERSION
from atcache.cache.inspect import format_inspection, inspect_cache, open_cache, verify_cache
from atcache.errors import AtcacheError
from helpers import TEST_IMGSZ, TEST_LAYERS, build_config

STRIDE = 8


@pytest.fixture(scope="module")
def grad_cache(voc_yaml, teacher_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad") / "grad.zarr"
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), gradient=True, gradient_stride=STRIDE))
    assert report.computed == report.total_rows
    return out


def _letterboxed(voc_yaml, rows):
    """ultralytics' own un-augmented samples (load_image, LetterBox(scaleup=False), Format): images (n, 3, S, S) uint8
    RGB and the label batch of their letterboxed boxes (normalised xywh)."""
    from atcache.yolo import YOLODataset, check_det_dataset, get_cfg

    data = check_det_dataset(str(voc_yaml))
    ds = YOLODataset(img_path=data["train"], imgsz=TEST_IMGSZ, augment=False, hyp=get_cfg(), data=data, prefix="")
    samples = [ds[r] for r in rows]
    images = torch.stack([s["img"] for s in samples])
    batch = {"batch_idx": torch.cat([torch.full((len(s["cls"]),), float(i)) for i, s in enumerate(samples)]),
             "cls": torch.cat([s["cls"].float() for s in samples]), "bboxes": torch.cat([s["bboxes"] for s in samples])}
    return images, batch, ds.im_files


def test_grad_arrays_equal_the_gradient_computed_directly(grad_cache, voc_yaml, teacher_pt):
    """(a) joined direction * norm equals input_gradient pooled, on ultralytics' letterboxed images and labels."""
    from atcache.yolo import load_model

    g = zarr.open_group(str(grad_cache), mode="r")
    spec = g.attrs["atcache"]
    assert spec["gradient_stride"] == STRIDE and spec["format_version"] == FORMAT_VERSION
    assert spec["gradient_gains"] == {"box": 7.5, "cls": 0.5, "dfl": 1.5}
    g_size, n = TEST_IMGSZ // STRIDE, spec["n_rows"]
    assert g["grad/direction"].shape == (n, 3, g_size, g_size) and g["grad/direction"].dtype == np.float16
    assert g["grad/norm"].shape == (n,) and g["grad/norm"].dtype == np.float32
    assert g["grad/direction"].chunks == (8, 3, g_size, g_size) and g["grad/norm"].chunks == (8,)
    rows = [0, 5, 11, n - 1]
    images, batch, im_files = _letterboxed(voc_yaml, rows)
    assert [str(p).endswith(f) for p, f in zip(np.asarray(im_files)[rows], g["files"][rows])] == [True] * len(rows)
    assert len(batch["cls"]) > 0
    model = load_model(teacher_pt, nc=20, fuse=False).model
    expected = pool_gradient(input_gradient(model, images.float() / 255, batch), STRIDE).double()
    direction = torch.from_numpy(g["grad/direction"][rows].astype(np.float64))
    norm = torch.from_numpy(g["grad/norm"][rows].astype(np.float64))
    stored = direction * norm.view(-1, 1, 1, 1)
    want = torch.linalg.vector_norm(expected.flatten(1), dim=1)
    assert (want > 0).all()
    cos = torch.nn.functional.cosine_similarity(stored.flatten(1), expected.flatten(1), dim=1)
    assert (cos > 0.999).all(), cos
    torch.testing.assert_close(norm, want, rtol=1e-3, atol=0)
    np.testing.assert_allclose(torch.linalg.vector_norm(direction.flatten(1), dim=1).numpy(), 1.0, atol=2e-3)


def test_maps_are_byte_identical_with_and_without_gradients(grad_cache, built_cache, assert_same_store):
    """(b) --gradient adds arrays and changes nothing else."""
    assert_same_store(grad_cache, built_cache)
    assert "grad" not in zarr.open_group(str(built_cache), mode="r")
    assert "gradient_stride" not in zarr.open_group(str(built_cache), mode="r").attrs["atcache"]
    assert open_cache(built_cache).grad is None and open_cache(built_cache).spec.gradient_stride == 0


def test_verify_finds_a_corrupted_grad_chunk_and_repair_recomputes_it(grad_cache, voc_yaml, teacher_pt, tmp_path):
    """(c) the grad arrays are checked and repaired like every other array."""
    out = tmp_path / "damaged.zarr"
    shutil.copytree(grad_cache, out)
    chunk = out / "grad" / "direction" / "c" / "2" / "0" / "0" / "0"  # rows 16-23
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    found = verify_cache(out)
    assert [(c["array"], c["chunk"], c["rows"]) for c in found] == [("grad/direction", 2, [16, 24])]
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), gradient=True, gradient_stride=STRIDE,
                                      resume=True, repair=True))
    assert report.repaired == {2: ["grad/direction"]} and report.computed == 8
    assert verify_cache(out) == []
    a, b = (zarr.open_group(str(p), mode="r") for p in (out, grad_cache))
    for name in ["grad/direction", "grad/norm", *(f"maps/{i}" for i in TEST_LAYERS)]:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_resume_with_another_gradient_stride_is_refused(grad_cache, voc_yaml, teacher_pt, tmp_path):
    """(d) the stride (and gradients at all) are part of the spec."""
    out = tmp_path / "c.zarr"
    shutil.copytree(grad_cache, out)
    for other in (dict(gradient=True, gradient_stride=4), dict(gradient=False)):
        with pytest.raises(AtcacheError, match="different settings \\(gradient_stride") as e:
            build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True, **other))
        assert "\n" not in str(e.value)
    with pytest.raises(AtcacheError, match="gradient_gains"):
        build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True, gradient=True,
                                 gradient_gains=(7.5, 0.0, 1.5)))
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True, gradient=True))
    assert report.computed == 0 and report.already_done == report.total_rows


def test_bad_gradient_settings_are_refused(voc_yaml, teacher_pt, tmp_path):
    with pytest.raises(AtcacheError, match="--gradient-stride 5 does not divide"):
        build_cache(build_config(voc_yaml, tmp_path / "x.zarr", teacher=str(teacher_pt), gradient=True, gradient_stride=5))
    with pytest.raises(AtcacheError, match="--gradient-stride sets the resolution of the stored gradients; add --gradient"):
        build_cache(build_config(voc_yaml, tmp_path / "y.zarr", teacher=str(teacher_pt), gradient_stride=4))
    with pytest.raises(AtcacheError, match="--gradient-gains sets the loss of the stored gradients; add --gradient"):
        build_cache(build_config(voc_yaml, tmp_path / "z.zarr", teacher=str(teacher_pt), gradient_gains=(7.5, 0.5, 1.5)))
    assert not (tmp_path / "y.zarr").exists() and not (tmp_path / "z.zarr").exists()


def test_open_cache_grad_is_direction_times_norm(grad_cache):
    """(e) open_cache(path).grad: (N, 3, G, G) float32 dask array = direction * norm, chunked as stored."""
    view = open_cache(grad_cache)
    g = zarr.open_group(str(grad_cache), mode="r")
    size = TEST_IMGSZ // STRIDE
    n = view.spec.n_rows
    assert view.grad.shape == (n, 3, size, size) and view.grad.dtype == np.float32
    assert view.grad.chunks[0] == g["grad/norm"].chunks[0:1] * (n // 8) + ((n % 8,) if n % 8 else ())
    expected = g["grad/direction"][:].astype(np.float32) * g["grad/norm"][:][:, None, None, None]
    np.testing.assert_array_equal(view.grad.compute(), expected)
    assert np.isfinite(expected).all() and view.spec.gradient_stride == STRIDE
    report = inspect_cache(grad_cache)
    assert report["gradient"]["stride"] == STRIDE and report["gradient"]["shape"] == [3, size, size]
    assert report["gradient"]["norm"]["min"] > 0
    assert f"input gradients: stride {STRIDE} (3x{size}x{size} per image)" in format_inspection(report)


@pytest.mark.parametrize("with_student", [False, True])
def test_visualize_adds_the_gradient_attention_column(grad_cache, voc_yaml, teacher_pt, tmp_path, with_student):
    """One more column, drawn: the teacher's gradient attention (and the student's, and |S-T|, with --student)."""
    from PIL import Image

    from helpers import invoke

    extra = ["--student", teacher_pt] if with_student else []
    result = invoke("visualize", grad_cache, "--data", voc_yaml, "--out", tmp_path, "--images", "2", *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    px, rows = int(2.6 * 80), 3 if with_student else 1
    for png in sorted(tmp_path.glob("*.png")):
        im = np.asarray(Image.open(png).convert("RGB")).astype(np.float32)
        assert im.shape[:2] == (rows * px, (len(TEST_LAYERS) + 2) * px)
        for r in range(rows):
            assert im[r * px:(r + 1) * px, -px:].std() > 10, r  # the gradient column is drawn in every row


def test_gradient_attention_pictures_are_the_papers_of_the_stored_gradients(grad_cache):
    from atcache.attention.gradient import gradient_attention
    from atcache.tools.visualize import _gradient_pictures

    J = open_cache(grad_cache).grad[:3].compute()
    pictures = _gradient_pictures(J)
    expected = (J ** 2).sum(1)
    expected /= np.linalg.norm(expected.reshape(3, -1), axis=1)[:, None, None]
    np.testing.assert_allclose(np.stack(pictures), expected, rtol=1e-4, atol=1e-6)
    assert gradient_attention(torch.from_numpy(J)).shape == (3, *J.shape[-2:])
