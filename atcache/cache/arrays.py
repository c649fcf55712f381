"""The store's arrays as dask arrays, chunked as stored and decoded chunk by chunk (reading errors surface at
compute): what `open_cache`, `inspect` and the tools read a cache through."""

from __future__ import annotations

import dask.array as da
import numpy as np

from atcache.cache.format import decode_maps
from atcache.cache.layout import replay_pixels, replay_stat_columns
from atcache.cache.store import CacheStore


def layer(store: CacheStore, index: int) -> tuple[da.Array, da.Array]:
    """(maps (N, H, W), norms (N,)) of layer `index`; uint8 maps are decoded with the scales of the same rows."""
    maps = da.from_zarr(store.group[f"maps/{index}"])
    if store.spec.map_dtype == "uint8":
        scales = da.from_zarr(store.group[f"scales/{index}"])
        maps = da.map_blocks(decode_maps, maps, scales[:, None, None], dtype=np.float16)
    return maps, da.from_zarr(store.group[f"norms/{index}"])


def _joined(direction: da.Array, norm: da.Array) -> da.Array:
    """J = norm * direction in float32, the norm broadcast over (3, G, G)."""
    return direction.astype(np.float32) * norm[(...,) + (None,) * 3]


def grad(store: CacheStore) -> da.Array | None:
    """J_T of every row (N, 3, G, G) float32 = direction * norm; None without gradients."""
    if not store.spec.gradient_stride:
        return None
    return _joined(da.from_zarr(store.group["grad/direction"]), da.from_zarr(store.group["grad/norm"]))


def replay_maps(store: CacheStore, index: int) -> da.Array:
    """Replay maps (E, M, H, W) of layer `index`, positions in training order, decoded like `layer`'s."""
    spec = store.spec
    offset, h, w = next((o, h, w) for i, o, h, w in replay_pixels(spec) if i == index)
    maps = da.from_zarr(store.group["replay/maps"])[:, :, offset:offset + h * w].reshape(
        spec.replay.epochs, spec.replay.samples, h, w)
    if spec.map_dtype == "uint8":
        scales = _stat(store, f"scale_{index}")
        maps = da.map_blocks(lambda q, s: decode_maps(q.reshape(-1, *q.shape[2:]), s.reshape(-1)).reshape(q.shape),
                             maps, scales[:, :, None, None], dtype=np.float16)
    return maps


def _stat(store: CacheStore, column: str) -> da.Array:
    """Column `column` (E, M) of `replay/stats`."""
    return da.from_zarr(store.group["replay/stats"])[:, :, replay_stat_columns(store.spec).index(column)]


def replay_grad(store: CacheStore) -> da.Array | None:
    """J_T of every replayed view (E, M, 3, G, G) float32, positions in training order; None without replay arrays
    or gradients."""
    if not (store.spec.gradient_stride and store.spec.replay is not None):
        return None
    return _joined(da.from_zarr(store.group["replay/grad/direction"]), _stat(store, "grad_norm"))
