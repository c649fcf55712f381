"""Stage 1's inner loop, the same in every runner: the teacher over the rows of some row-chunks, batches that never
span two chunks, each finished chunk written whole on a background thread."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from atcache.config import BuildConfig
from atcache.data.splits import LetterboxedImages, SplitFiles
from atcache.errors import AtcacheError
from atcache.attention.recipe import layer_maps
from atcache.teacher.writer import UnitWriter
from atcache.cache.store import CacheStore, ChunkData, iter_rows


class _ChunkBatches(torch.utils.data.Sampler):
    """Batches that never span two row-chunks, so a chunk's batches are the same whether built whole or resumed."""

    def __init__(self, store: CacheStore, chunks: Sequence[int], batch: int, position: dict[int, int]):
        self.store, self.chunks, self.batch, self.position = store, list(chunks), batch, position

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.chunks:
            a, b = self.store.chunk_range(k)
            for s in range(a, b, self.batch):
                yield [self.position[r] for r in range(s, min(s + self.batch, b))]

    def __len__(self) -> int:
        sizes = (b - a for a, b in map(self.store.chunk_range, self.chunks))
        return sum(-(-size // self.batch) for size in sizes)


class _ChunkAssembler:
    """Collects the per-batch results of one row-chunk until it is complete."""

    def __init__(self, store: CacheStore, k: int):
        self.k, (self.a, self.b) = k, store.chunk_range(k)
        self.parts: list[tuple] = []  # (rows, maps, norms, letterbox, ok, (grad direction, grad norm) or None)
        self.count = 0

    def add(self, rows, maps, norms, letterbox, ok, grad=None) -> bool:
        self.parts.append((rows, maps, norms, letterbox, ok, grad))
        self.count += len(rows)
        return self.count == self.b - self.a

    def data(self) -> ChunkData:
        rows = np.concatenate([p[0] for p in self.parts])
        if not np.array_equal(rows, np.arange(self.a, self.b)):
            raise RuntimeError(f"chunk {self.k} assembled rows out of order")
        layers = self.parts[0][1].keys()
        return ChunkData(
            maps={i: np.concatenate([p[1][i] for p in self.parts]) for i in layers},
            norms={i: np.concatenate([p[2][i] for p in self.parts]) for i in layers},
            letterbox=np.concatenate([p[3] for p in self.parts]),
            ok=np.concatenate([p[4] for p in self.parts]),
            **({} if self.parts[0][5] is None else {
                "grad_direction": np.concatenate([p[5][0] for p in self.parts]),
                "grad_norm": np.concatenate([p[5][1] for p in self.parts])}),
        )


def compute_chunks(cfg: BuildConfig, model: torch.nn.Module, split: SplitFiles, store: CacheStore,
                   todo: Sequence[int], device: torch.device) -> list[tuple[str, str]]:
    """Teacher maps for the rows of row-chunks `todo` (model on `device`), each chunk written when its last batch is
    done; returns the images skipped as unreadable (--skip-bad; without it the first one stops the build)."""
    from tqdm import tqdm

    rows = list(iter_rows(todo, store))
    position = {r: i for i, r in enumerate(rows)}
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    gradients = bool(store.spec.gradient_stride)  # --gradient: the images come with their labels
    loader = torch.utils.data.DataLoader(
        LetterboxedImages(split, rows, cfg.imgsz, labels=gradients),
        batch_sampler=_ChunkBatches(store, todo, cfg.batch, position), collate_fn=LetterboxedImages.collate,
        num_workers=cfg.workers, pin_memory=cuda, persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    grad_model = None
    if gradients:  # an unfused copy of the teacher (atcache.teacher.gradients)
        from atcache.attention.gradient import loss_labels
        from atcache.teacher.gradients import gradient_teacher, teacher_gradients

        grad_model = gradient_teacher(cfg.teacher, len(split.names), store.spec, device)
    writer = UnitWriter(store)
    skipped: list[tuple[str, str]] = []
    chunk_iter = iter(todo)
    assembler = _ChunkAssembler(store, next(chunk_iter))
    bar = tqdm(total=len(rows), desc=f"build-cache {Path(cfg.out).name}", unit="img", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        for batch_rows, images, letterbox, errors, labels in loader:
            ok = np.array([not e for e in errors], dtype=bool)
            for r, e in zip(batch_rows.tolist(), errors):
                if e:
                    if not cfg.skip_bad:
                        raise AtcacheError(e)
                    skipped.append((split.files[r], e))
            maps, norms = layer_maps(model, images, cfg.layers, cfg.p, cfg.kind)
            bad = ~torch.as_tensor(ok, device=maps[0].device)
            for a, n in zip(maps, norms):
                a[bad] = float("nan")
                n[bad] = float("nan")
            grad = None
            if grad_model is not None:  # the label batch as the replay build's: ultralytics' collate_fn
                grad = teacher_gradients(grad_model, images, loss_labels(labels), store.spec.gradient_stride, ok)
            if assembler.add(batch_rows.numpy(), {i: a.to(torch.float16).cpu().numpy() for i, a in zip(cfg.layers, maps)},
                             {i: n.cpu().numpy() for i, n in zip(cfg.layers, norms)}, letterbox.numpy(), ok, grad):
                writer.put(assembler.k, assembler.data())
                nxt = next(chunk_iter, None)
                assembler = _ChunkAssembler(store, nxt) if nxt is not None else None
            bar.update(len(batch_rows))
    finally:
        bar.close()
        writer.close()
    return skipped


def compute_units(cfg: BuildConfig, model: torch.nn.Module, split: SplitFiles, store: CacheStore,
                  units: Sequence[int], device: torch.device) -> list[tuple[str, str]]:
    """Row-chunks of the static arrays (`compute_chunks`) and replay chunks (`replay.compute_replay`) among `units`;
    returns the images skipped as unreadable."""
    static = [u for u in units if store.replay_unit(u) is None]
    replayed = [u for u in units if store.replay_unit(u) is not None]
    skipped = compute_chunks(cfg, model, split, store, static, device) if static else []
    if replayed:
        from atcache.yolo import prepare

        prepare()
        from atcache.teacher.replay import compute_replay

        compute_replay(cfg, model, store, replayed, device)
    return skipped
