"""The replay part of a build (`build-cache --replay-epochs E`): the teacher over every augmented view of E epochs of
seeded training, made by the training's own dataset (`atcache.train.replay`), one replay unit written whole at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atcache.attention.gradient import loss_labels
from atcache.attention.recipe import layer_maps
from atcache.cache.format import AUGMENT_KEYS, ReplaySpec
from atcache.teacher.writer import UnitWriter
from atcache.cache.store import CacheStore
from atcache.config import BuildConfig
from atcache.train.replay import augment_settings, check_training_set, files_sha256, fingerprint, training_dataset
from atcache.train.samplers import EpochSampler


def replay_spec(cfg: BuildConfig, imgsz: int) -> ReplaySpec:
    """What the replay arrays will hold, from the settings and the training dataset they imply."""
    hyp = augment_settings(dict(cfg.augment), cfg.replay_epochs, imgsz)
    dataset, data = training_dataset(cfg.data, hyp, cfg.aug_seed)
    return ReplaySpec(epochs=cfg.replay_epochs, aug_seed=cfg.aug_seed, samples=len(dataset),
                      chunk_rows=cfg.chunk_rows, files_sha256=files_sha256(dataset.im_files, data["path"]),
                      augment={k: getattr(hyp, k) for k in AUGMENT_KEYS})


class _UnitBatches(torch.utils.data.Sampler):
    """Batches of sampled keys (epoch * M + index) that never span two replay units."""

    def __init__(self, units: Sequence[tuple[int, int, int]], orders: dict[int, np.ndarray], samples: int, batch: int):
        self.units, self.orders, self.samples, self.batch = list(units), orders, samples, batch

    def __iter__(self):
        for e, a, b in self.units:
            keys = (self.orders[e][a:b] + e * self.samples).tolist()
            for s in range(0, len(keys), self.batch):
                yield keys[s:s + self.batch]

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch) for _, a, b in self.units)


def compute_replay(cfg: BuildConfig, model: torch.nn.Module, store: CacheStore, units: Sequence[int],
                   device: torch.device) -> None:
    """Teacher maps (and with --gradient the input gradients J_T, from the unfused copy `build.gradients` makes, on
    each view's own labels) on the augmented images of replay units `units`, each written whole."""
    from tqdm import tqdm

    replay = store.spec.replay
    hyp = augment_settings(dict(replay.augment), replay.epochs, store.spec.imgsz)
    dataset, data = training_dataset(cfg.data, hyp, replay.aug_seed)
    check_training_set(replay, dataset.im_files, data["path"], store.path)
    spans = [store.replay_unit(u) for u in units]
    sampler = EpochSampler(replay.samples, replay.aug_seed)
    orders = {e: sampler.order(e) for e in sorted({e for e, _, _ in spans})}
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_UnitBatches(spans, orders, replay.samples, cfg.batch), num_workers=cfg.workers,
        collate_fn=dataset.collate_fn, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    bar = tqdm(total=sum(b - a for _, a, b in spans), desc=f"replay {Path(cfg.out).name}", unit="img",
               disable=not cfg.progress, dynamic_ncols=True)
    grad_model = None
    if store.spec.gradient_stride:
        from atcache.teacher.gradients import gradient_teacher, teacher_gradients

        grad_model = gradient_teacher(cfg.teacher, len(data["names"]), store.spec, device)
    batches = iter(loader)
    writer = UnitWriter(store, store.write_replay)  # unit u is compressed and written while u + 1 is computed
    try:
        for u, (e, a, b) in zip(units, spans):
            parts = []
            while sum(len(p[0]) for p in parts) < b - a:
                batch = next(batches)
                maps, norms = layer_maps(model, batch["img"], cfg.layers, store.spec.p, store.spec.kind, store.spec.eps)
                records = np.array([fingerprint(im) for im in batch["img"]], dtype=np.uint64)
                grad = None
                if grad_model is not None:
                    grad = teacher_gradients(grad_model, batch["img"], loss_labels(batch), store.spec.gradient_stride,
                                             np.ones(len(records), dtype=bool))
                parts.append((records, [m.to(torch.float16).cpu().numpy() for m in maps],
                              [n.cpu().numpy() for n in norms], grad))
                bar.update(len(records))
            writer.put(
                u, maps={i: np.concatenate([p[1][j] for p in parts]) for j, i in enumerate(cfg.layers)},
                norms={i: np.concatenate([p[2][j] for p in parts]) for j, i in enumerate(cfg.layers)},
                samples=orders[e][a:b], records=np.concatenate([p[0] for p in parts]),
                grad=None if grad_model is None else tuple(np.concatenate([p[3][j] for p in parts]) for j in (0, 1)))
    finally:
        bar.close()
        writer.close()


