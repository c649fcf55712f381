"""What the test modules share besides fixtures (tests/conftest.py): the toy settings the suite runs at, command lines,
assertions, and the synthetic stores of atcache.cache.synthetic. Heavy imports stay inside the functions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from atcache.cache.synthetic import fake_spec, fake_store, fill_store, random_chunk, seed_layers  # noqa: F401

TEST_IMGSZ = 64
TEST_LAYERS = (6, 8, 13, 16, 19, 22)
COMMON = ["--student", "yolo11n.yaml", "--epochs", "1", "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu",
          "plots=False", "workers=0", "nbs=4"]  # training options for one tiny epoch; nbs=batch: a step every batch


def build_config(data_yaml, out, **overrides):
    """A BuildConfig at the test settings (yolo11n.yaml teacher, imgsz 64, batch 4, cpu, chunks of 8 rows)."""
    from atcache.config import BuildConfig

    kw = dict(teacher="yolo11n.yaml", data=str(data_yaml), out=str(out), imgsz=TEST_IMGSZ, batch=4, device="cpu",
              workers=0, chunk_rows=8, layers=TEST_LAYERS, progress=False)
    kw.update(overrides)
    return BuildConfig(**kw)


def build_args(data, teacher, out, *extra, chunk_rows: int = 8) -> list[str]:
    """`atcache build-cache` arguments at the test settings of `build_config` (strings, for CliRunner or argv)."""
    return ["build-cache", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu", "--workers", "0", "--chunk-rows", str(chunk_rows), "--no-progress",
            *(str(a) for a in extra)]


def cli_command(data, teacher, out, *extra) -> list[str]:
    """`python -m atcache build-cache` (a fresh process) with the settings of `build_args`."""
    import sys

    return [sys.executable, "-m", "atcache", *build_args(data, teacher, out, *extra)]


def invoke(*args):
    """`atcache ARGS` through typer's CliRunner (arguments str()-ed); the result has exit_code and output."""
    from typer.testing import CliRunner

    from atcache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def yolo_dataset(data_yaml, split: str = "train", imgsz: int = TEST_IMGSZ):
    """The YOLODataset ultralytics' trainer builds for `split` (augment=True, default hyperparameters)."""
    from atcache.yolo import YOLODataset, check_det_dataset, get_cfg

    data = check_det_dataset(str(data_yaml))
    return YOLODataset(img_path=data[split], imgsz=imgsz, augment=True, hyp=get_cfg(), data=data, prefix="")


def train_dataset(data_yaml, **hyp):
    """The training dataset ultralytics' trainer builds (build_yolo_dataset, mode train, batch 4) for these settings,
    and the cfg it was built with."""
    from atcache.yolo import build_yolo_dataset, check_det_dataset, get_cfg

    args = get_cfg(overrides={"imgsz": TEST_IMGSZ, "data": str(data_yaml), **hyp})
    data = check_det_dataset(str(data_yaml))
    return build_yolo_dataset(args, data["train"], batch=4, data=data, mode="train"), data, args


def target_dataset(data_yaml, cache, mode="warp", layers=TEST_LAYERS, **hyp):
    """The training dataset ultralytics builds for these settings, with cached targets attached."""
    from atcache.train.datasets import build_dataset
    from atcache.train.targets import CacheTargets
    from atcache.yolo import check_det_dataset, get_cfg

    args = get_cfg(overrides={"imgsz": TEST_IMGSZ, "data": str(data_yaml), **hyp})
    data = check_det_dataset(str(data_yaml))
    return build_dataset(args, data["train"], data, batch=4, targets=CacheTargets.load(cache, layers), target_mode=mode)


def save_teacher_checkpoint(path, cfg: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """A random teacher checkpoint whose maps are not ~eps (He-normal convs; see atcache.yolo.save_random_teacher)."""
    from atcache.yolo import save_random_teacher

    return save_random_teacher(cfg, path, nc=20, seed=seed, imgsz=TEST_IMGSZ)


def results(run) -> dict[str, float]:
    """The last row of an ultralytics run's results.csv, keys stripped."""
    with open(Path(run) / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {k.strip(): float(v) for k, v in rows[-1].items()}


def assert_one_line_error(result, *needles) -> None:
    """A CliRunner result that is exit code 2 and exactly one line `atcache: error: ...` containing every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("atcache: error:"), result.output
    for n in needles:
        assert n in lines[0], lines[0]


def assert_clean(out) -> None:
    """No leftovers of interrupted writes and no ownership records in the local store `out`."""
    from atcache.cache.claims import LOCK_PREFIX

    out = Path(out)
    assert not list(out.rglob("*.partial")), "leftovers of interrupted writes"
    assert not (out / LOCK_PREFIX).exists(), "ownership records left behind"


def traced_views(ds, n):
    """(augmented image, recorded view) for n samples, with the view taken before __getitem__ drops it."""
    from atcache.train.targets import VIEW_KEY

    out = []
    for i in range(n):
        labels = ds.transforms(ds.get_image_and_label(i % len(ds)))
        out.append((labels["img"].numpy().transpose(1, 2, 0)[..., ::-1].astype(np.float64), labels[VIEW_KEY]))
    return out


# ---------------------------------------------------------------------- the warp renderer's rules, stated cell by cell
def bilinear_at(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples of grid (H, W) at (u, v), edges extended."""
    h, w = grid.shape
    u, v = np.clip(u, 0, w - 1), np.clip(v, 0, h - 1)
    u0, v0 = np.minimum(np.floor(u).astype(int), max(w - 2, 0)), np.minimum(np.floor(v).astype(int), max(h - 2, 0))
    u1, v1 = np.minimum(u0 + 1, w - 1), np.minimum(v0 + 1, h - 1)
    fu, fv = u - u0, v - v0
    return ((1 - fu) * (1 - fv) * grid[v0, u0] + fu * (1 - fv) * grid[v0, u1] + (1 - fu) * fv * grid[v1, u0]
            + fu * fv * grid[v1, u1])


def inside_image(x, y, shape) -> np.ndarray:
    """Points whose nearest pixel lies in an image of `shape` (h, w)."""
    return (x >= -0.5) & (x < shape[1] - 0.5) & (y >= -0.5) & (y < shape[0] - 0.5)


def through_piece(p, k: int, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held by every clip of piece k, x, y in its source) of output points pts (3, P) (homogeneous) of pieces `p`."""
    from atcache.train.render import NO_CLIP

    def through(matrix):
        q = matrix @ pts
        return q[0] / q[2], q[1] / q[2]

    clipped = np.ones(pts.shape[1], bool)
    for m, shape in zip(p.clips[k], p.clip_shape[k]):
        if shape[0] != NO_CLIP:
            clipped &= inside_image(*through(m), shape)
    return (clipped, *through(p.to_source[k]))


def spec_targets(targets, p) -> list[np.ndarray]:
    """Per layer, one view's target by the rules, cell by cell (`targets` a cache in RAM, `p` the view's pieces): each
    cell centre ((s - 1) / 2 + s * index) goes through a piece's clips (all must hold it) and matrix into its source;
    in each blend group the last piece covering the cell gives the energy sampled bilinearly at the source point
    (through the row's pad, at the layer's stride), weighted by the group's weight; a cell no piece covers takes the
    first piece whose cached grid reaches it, else the layer's grey energy; the map is renormalised."""
    h, w = p.shape
    out = []
    for layer in targets.layers:
        s, c = targets.stride(layer), (targets.stride(layer) - 1) / 2.0
        ys, xs = np.mgrid[0:h // s, 0:w // s].astype(np.float64) * s + c
        pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
        painted, borrowed = {}, {}  # blend group -> weighted value per cell (nan: none yet)
        for k, row in enumerate(p.rows):
            clipped, x, y = through_piece(p, k, pts)
            energy = targets.energy(layer, int(row)).astype(np.float64)
            u, v = (x + p.pad[k][1] - c) / s, (y + p.pad[k][0] - c) / s
            reaches = clipped & (u >= -0.5) & (u <= energy.shape[1] - 0.5) & (v >= -0.5) & (v <= energy.shape[0] - 0.5)
            value = p.weight[k] * bilinear_at(energy, u, v)
            g = int(p.group[k])
            painted.setdefault(g, np.full(xs.size, np.nan))
            borrowed.setdefault(g, np.full(xs.size, np.nan))
            painted[g] = np.where(clipped & inside_image(x, y, p.source_shape[k]), value, painted[g])  # the last wins
            borrowed[g] = np.where(np.isnan(borrowed[g]) & reaches, value, borrowed[g])  # the first stays
        covered = np.any([~np.isnan(a) for a in painted.values()], axis=0)
        got = np.any([~np.isnan(a) for a in borrowed.values()], axis=0)
        e = np.where(covered, np.nansum(list(painted.values()), axis=0),
                     np.where(got, np.nansum(list(borrowed.values()), axis=0), targets.grey[layer]))
        e = e.reshape(xs.shape)
        out.append(e / (np.linalg.norm(e) + targets.spec.eps))
    return out


def race_claims(store, starts, size: int = 100) -> list:
    """Claims of units [s, s + size) for each start, acquired at the same moment from one thread each: those that
    proceeded (the others were refused)."""
    import threading

    from atcache.cache.claims import ChunkClaim
    from atcache.errors import AtcacheError

    got, barrier = [], threading.Barrier(len(starts))

    def take(units):
        claim = ChunkClaim(store, units)
        barrier.wait()
        try:
            got.append(claim.acquire())
        except AtcacheError:
            pass

    threads = [threading.Thread(target=take, args=(range(s, s + size),)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def race_creation(path, spec, files, builders: int = 4) -> tuple[list, list]:
    """`builders` shards opening a new store at `path` at the same moment, one thread each (as `--shard i/n` processes
    started together): (the stores they got, the errors they met)."""
    import threading

    from atcache.cache.store import CacheStore

    stores, errors, barrier = [], [], threading.Barrier(builders)

    def open_store():
        barrier.wait()
        try:
            stores.append(CacheStore.open_or_create(path, spec, files, resume=False, overwrite=False, join=True))
        except Exception as e:  # noqa: BLE001 - the caller asserts there is none
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(builders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stores, errors


def lively_model(seed: int = 0, dtype=None):
    """A YOLO11n (nc=20) in eval mode whose loss depends on its input: He-normal convs (the stock init shrinks the
    activations to ~0 by the head) and class biases 0 (the stock prior makes the assigner's align metric ~eps)."""
    import torch
    from torch import nn

    from atcache.yolo import DetectionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DetectionModel("yolo11n.yaml", nc=20, verbose=False)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for seq in model.model[-1].cv3:
            nn.init.zeros_(seq[-1].bias)
    return model.to(dtype or torch.float32).eval()
