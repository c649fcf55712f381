"""Stores that no teacher wrote: a spec and smooth random rows shaped like the reference setup's maps, written through
`CacheStore` as a build writes them (the storage benchmarks in pipelines/ and the tests measure and check the store on
them without running a model)."""

from __future__ import annotations

import cv2
import numpy as np


def seed_layers(imgsz: int = 640) -> tuple:
    """The reference setup's six YOLO11 layers (6, 8, 13, 16, 19, 22; strides 16, 32, 16, 8, 16, 32) as LayerSpecs at `imgsz`."""
    from atcache.cache.format import LayerSpec

    strides = {6: (16, 128), 8: (32, 256), 13: (16, 128), 16: (8, 64), 19: (16, 128), 22: (32, 256)}
    return tuple(LayerSpec(i, s, c, imgsz // s, imgsz // s) for i, (s, c) in strides.items())


def fake_spec(layers, n_rows: int, chunk_rows: int, imgsz: int = 640, teacher: str = "synthetic"):
    """A CacheSpec for a store that no teacher wrote (tests, storage benchmarks)."""
    from atcache.cache.format import CacheSpec

    return CacheSpec(
        layers=tuple(layers), imgsz=imgsz, p=2.0, kind="sum_p", eps=1e-8, teacher_sha256=teacher,
        teacher_weights_sha256="synthetic", teacher_name="synthetic", split="train", dataset_fingerprint="synthetic",
        n_rows=n_rows, chunk_rows=chunk_rows,
    ).stamped()


def random_chunk(spec, a: int, b: int, rng: np.random.Generator, smooth: bool = False):
    """ChunkData for rows a:b: random maps (smooth ones, upsampled from 5x5 and unit-norm, compress like real maps),
    norms and letterbox rows; every row read."""
    from atcache.cache.store import ChunkData

    maps, norms = {}, {}
    for layer in spec.layers:
        if smooth:
            low = rng.random((b - a, 5, 5), dtype=np.float32)
            m = np.stack([cv2.resize(x, (layer.width, layer.height), interpolation=cv2.INTER_LINEAR) for x in low])
            maps[layer.index] = (m / np.linalg.norm(m, axis=(1, 2), keepdims=True)).astype(np.float16)
            norms[layer.index] = rng.random(b - a, dtype=np.float32) + 0.5
        else:
            maps[layer.index] = rng.random((b - a, layer.height, layer.width)).astype(np.float16)
            norms[layer.index] = rng.random(b - a).astype(np.float32)
    letterbox = rng.random((b - a, len(spec.letterbox.columns))).astype(np.float32)
    grad = {}
    if spec.gradient_stride:  # a store with gradients: random directions and norms too
        g = spec.gradient_size
        grad = dict(grad_direction=rng.random((b - a, 3, g, g)).astype(np.float16),
                    grad_norm=rng.random(b - a).astype(np.float32))
    return ChunkData(maps, norms, letterbox, np.ones(b - a, bool), **grad)


def fake_store(path, spec, chunk=None, files=None):
    """A store created through CacheStore and filled by `fill_store` (default: smooth random maps, seed 0)."""
    from atcache.cache.store import CacheStore

    store = CacheStore.create(path, spec, files or [f"images/{i:07d}.jpg" for i in range(spec.n_rows)])
    fill_store(store, chunk)
    return store


def fill_store(store, chunk=None, chunks=None) -> None:
    """Write row-chunks `chunks` (default: all) of `store`, each `chunk(spec, a, b)` -> ChunkData for rows a:b."""
    rng = np.random.default_rng(0)
    chunk = chunk or (lambda spec, a, b: random_chunk(spec, a, b, rng, smooth=True))
    for k in range(store.n_chunks) if chunks is None else chunks:
        store.write_chunk(k, chunk(store.spec, *store.chunk_range(k)))
