"""`atcache fidelity`: how close the targets train-from-cache builds are to what the teacher says on the augmented
image. Runs the training data pipeline (augmentations, targets) for a few batches, runs the live teacher on the same
images, and compares per layer and per augmentation kind. Warp targets are rendered as training renders them: each
sample's view flattened in the loader, the batch rendered on the device by the cache's `render.BatchRenderer` (the
one renderer). Besides build-cache, the only command that loads the teacher. ultralytics names come through
atcache.yolo."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from atcache.attention.agreement import map_agreement
from atcache.config import check_replay
from atcache.errors import AtcacheError
from atcache.settings import FidelityConfig
from atcache.train.views import Blend, Canvas, Source, View

AUGMENTATIONS = ("none", "flip", "mosaic", "affine", "mixup")  # what view_kinds tells apart


def view_kinds(view: View) -> set[str]:
    """The augmentations a recorded view went through (an affine counts unless it only centres the image; the
    letterbox does not count)."""
    kinds: set[str] = set()

    def visit(v):
        if isinstance(v, Blend):
            kinds.add("mixup")
            for part, _ in v.parts:
                visit(part)
        elif isinstance(v, Canvas):
            if v.tag == "affine" and not _centring(v):
                kinds.add("affine")
            elif v.tag in ("mosaic", "flip"):
                kinds.add(v.tag)
            for placed in v.children:
                visit(placed.view)
        elif not isinstance(v, Source):
            raise TypeError(f"not a view: {type(v).__name__}")

    visit(view)
    return kinds or {"none"}


def _centring(canvas: Canvas) -> bool:
    """An affine that only centres its child on the canvas (what RandomPerspective does with scale and translate 0)."""
    m, (h, w) = canvas.children[0].matrix, canvas.children[0].view.shape
    centre = np.array([[1, 0, (canvas.shape[1] - w) / 2], [0, 1, (canvas.shape[0] - h) / 2], [0, 0, 1]])
    return bool(np.allclose(m, centre, atol=0.51))  # ultralytics rounds the offset to whole pixels


def training_dataset(cfg: FidelityConfig, store, layers: tuple[int, ...]):
    """The train split as train-from-cache builds it: ultralytics' YOLODataset with its augmentations, targets attached
    (warp targets: as the flattened views the trainer renders per batch)."""
    from atcache.yolo import get_cfg
    from atcache.yolo import DEFAULT_CFG

    from atcache.data.splits import load_data_yaml
    from atcache.train.datasets import build_dataset
    from atcache.train.targets import CacheTargets

    unknown = [k for k in cfg.hyp if k not in DEFAULT_CFG.__dict__]
    if unknown:
        raise AtcacheError(f"{unknown[0]!r} is not an ultralytics argument; pass augmentation settings such as mosaic=0")
    replay = store.spec.replay if cfg.targets == "replay" else None
    settings = dict(cfg.hyp)
    if cfg.targets == "replay":  # the augmentation the replay arrays were made with, seeded as they were
        settings = check_replay(cfg.cache, replay, settings)
    hyp = get_cfg(DEFAULT_CFG, {**settings, "imgsz": store.spec.imgsz})
    data = load_data_yaml(cfg.data)
    if replay is None:
        return build_dataset(hyp, data["train"], data, "train", cfg.batch, 32, targets=CacheTargets.load(store, layers),
                             target_mode=cfg.targets, pieces=True)
    from atcache.train.replay import ReplayTargets

    return build_dataset(hyp, data["train"], data, "train", cfg.batch, 32,
                         targets=ReplayTargets(store.path, store.spec, layers, gradients=cfg.gradient),
                         target_mode="replay",
                         aug_seed=replay.aug_seed, epochs=hyp.epochs)


def measure_fidelity(cfg: FidelityConfig) -> dict:
    """Per layer and augmentation kind: cosine (mean, 5th percentile) and AT distance between cached targets and the
    live teacher's maps on the same augmented images."""
    from tqdm import tqdm

    from atcache.data.splits import split_files
    from atcache.devices import resolve_device
    from atcache.attention.recipe import layer_maps
    from atcache.cache.store import CacheStore
    from atcache.train.render import PIECES_KEY
    from atcache.train.targets import TARGETS_KEY
    from atcache.yolo import load_model
    from atcache.train.checks import check_cache

    if cfg.batches < 1 or cfg.batch < 1:
        raise AtcacheError("--batches and --batch must be at least 1")
    if not Path(cfg.cache).exists():
        raise AtcacheError(f"cache {cfg.cache} does not exist; pass the store written by build-cache")
    store = CacheStore.open(cfg.cache)
    spec = store.spec
    layers = spec.layer_indices
    split = split_files(cfg.data, "train")
    check_cache(cfg.cache, layers, spec.imgsz, split, store=store)
    device = resolve_device(cfg.device)
    teacher = load_model(cfg.teacher, nc=len(split.names), device=device)
    if teacher.weights_sha256 != spec.teacher_weights_sha256:
        raise AtcacheError(f"teacher {cfg.teacher} is not the one cache {cfg.cache} was built with ({spec.teacher_path}); "
                           "pass that checkpoint")
    if cfg.gradient:
        _check_gradient_targets(cfg, store)
    dataset = training_dataset(cfg, store, layers)
    renderer = dataset.at_cache.batch_renderer(device) if dataset.at_pieces else None  # the trainer's, on its device
    gradients = _gradient_check(cfg, store, len(split.names), device, dataset) if cfg.gradient else None
    random.seed(cfg.seed)  # ultralytics' augmentations draw from python's and numpy's generators
    np.random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    records = []  # (kinds, {layer: (cosine, distance)})
    for _ in tqdm(range(cfg.batches), desc="fidelity", unit="batch"):
        keys = rng.integers(0, len(dataset) * (spec.replay.epochs if cfg.targets == "replay" else 1), cfg.batch)
        samples = [dataset.sample_with_view(int(k)) for k in keys]  # replay: key = epoch * N + index
        batch = dataset.collate_fn([dict(labels) for labels, _ in samples])  # as the trainer's loader batches them
        live, _ = layer_maps(teacher.model, batch["img"], layers, spec.p, spec.kind, spec.eps)
        cached = renderer.render(batch[PIECES_KEY]) if renderer is not None else batch[TARGETS_KEY]
        agreement = {}  # layer -> (cosine (B,), distance (B,))
        for layer, maps, target in zip(layers, live, cached):
            agreement[layer] = map_agreement(maps.cpu().numpy(), target.cpu().numpy())
        if gradients is not None:
            agreement["gradient"] = gradients.agreement(batch)
        for k, (_, view) in enumerate(samples):
            figures = {layer: (float(c[k]), float(d[k])) for layer, (c, d) in agreement.items()}
            records.append((view_kinds(view), figures))
    return _fidelity_report(cfg, layers + (("gradient",) if gradients is not None else ()), records)


class _GradientCheck:
    """Stored J_T of each compared sample, as training reads it (`source`: a replayed view's, delivered with the
    sample, or a static row's), vs the live teacher's (unfused, eval mode) on the same image and labels, pooled by the
    cache's stride: cosine and norm ratio stored / live."""

    def __init__(self, model: torch.nn.Module, source):
        self.model, self.source = model, source

    def agreement(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        """Cosine and norm ratio (B,) of the compared samples, collated as the trainer's loader batches them."""
        from atcache.attention.gradient import input_gradient, loss_labels

        device = next(self.model.parameters()).device
        labels = {k: v.to(device) for k, v in loss_labels(batch).items()}
        live = self.source.pool(input_gradient(self.model, batch["img"].to(device).float() / 255, labels)).cpu()
        a, b = self.source.teacher(batch).flatten(1).double(), live.flatten(1).double()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
        ratio = a.norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)
        return cosine.numpy(), ratio.numpy()


def _check_gradient_targets(cfg: FidelityConfig, store) -> None:
    """Refuse --gradient where no J_T is cached for the compared samples."""
    if not store.spec.gradient_stride:
        raise AtcacheError(f"cache {cfg.cache} holds no input gradients; build it with build-cache --gradient")
    if cfg.targets == "warp":
        raise AtcacheError("--gradient compares J_T of cached images: use --targets replay (augmented views) or static "
                           "(letterboxed rows); a warp of a gradient is not one")


def _gradient_check(cfg: FidelityConfig, store, nc: int, device, dataset) -> _GradientCheck:
    """The unfused teacher for live J_T, and the cached J_T as training reads them."""
    from atcache.teacher.gradients import gradient_teacher
    from atcache.train.gradients import CachedGradients, ReplayGradients

    source = (ReplayGradients(store.spec.gradient_stride, store.spec.imgsz) if cfg.targets == "replay"
              else CachedGradients.load(store, dataset.im_files, dataset.at_rows))
    return _GradientCheck(gradient_teacher(cfg.teacher, nc, store.spec, device), source)


def _fidelity_report(cfg: FidelityConfig, layers, records) -> dict:
    """Aggregate per-sample figures by layer, for all samples and per augmentation kind (a sample counts for every
    kind it went through; 'none' = letterbox only)."""
    def stats(values, second):  # the second figure: AT distance of a map, norm ratio (stored / live) of a gradient
        cos = np.array([v[0] for v in values])
        other = np.array([v[1] for v in values])
        return {"n": len(values), "cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
                second: float(other.mean())}

    out = {}
    for layer in layers:
        second = "norm_ratio_mean" if layer == "gradient" else "at_distance_mean"
        per = {"all": stats([fig[layer] for _, fig in records], second)}
        for kind in AUGMENTATIONS:
            values = [fig[layer] for kinds, fig in records if kind in kinds]
            if values:
                per[kind] = stats(values, second)
        out[str(layer)] = per
    combos: dict[str, int] = {}
    for kinds, _ in records:
        key = "+".join(k for k in AUGMENTATIONS if k in kinds)
        combos[key] = combos.get(key, 0) + 1
    return {"config": asdict(cfg), "samples": len(records), "layers": out, "combinations": combos}


def format_fidelity(report: dict) -> str:
    lines = [f"{report['samples']} augmented samples ({report['config']['targets']} targets); augmentations seen: "
             + ", ".join(f"{k} {n}" for k, n in sorted(report["combinations"].items(), key=lambda x: -x[1])), "",
             f"{'layer':>8} {'kind':>7} {'n':>5} {'cosine mean':>11} {'cosine p5':>10} {'AT dist':>8}"]
    for layer, per in report["layers"].items():
        for kind, s in per.items():
            lines.append(f"{layer:>8} {kind:>7} {s['n']:>5} {s['cosine_mean']:>11.4f} {s['cosine_p5']:>10.4f} "
                         f"{s.get('at_distance_mean', s.get('norm_ratio_mean')):>8.4f}")
    if "gradient" in report["layers"]:
        lines.append("gradient: the cached input gradient J_T vs the live teacher's; last column: norm ratio "
                     "stored / live")
    return "\n".join(lines)
