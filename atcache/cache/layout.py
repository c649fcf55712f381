"""The arrays of a store as the schema in atcache.cache.format lays them out (format version 3, the only one): creating
them, and a replay unit's values packed into (and unpacked from) the replay arrays (maps and stats of all layers in one
array each)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import zarr

from atcache.cache.format import (CacheSpec, decode_maps, encode_maps, grid_dims, map_compressors, map_fill,
                                  small_compressors)


def replay_stat_columns(spec: CacheSpec) -> tuple[str, ...]:
    """The columns of `replay/stats`: norm_<i> per layer, scale_<i> per layer (uint8), grad_norm."""
    scales = tuple(f"scale_{i}" for i in spec.layer_indices) if spec.map_dtype == "uint8" else ()
    return tuple(f"norm_{i}" for i in spec.layer_indices) + scales + (("grad_norm",) if spec.gradient_stride else ())


def replay_pixels(spec: CacheSpec) -> list[tuple[int, int, int, int]]:
    """(layer index, offset, H, W) of each layer's map within a view's row of `replay/maps`."""
    out, offset = [], 0
    for layer in spec.layers:
        out.append((layer.index, offset, layer.height, layer.width))
        offset += layer.height * layer.width
    return out


def replay_array_names(spec: CacheSpec) -> list[str]:
    """The replay arrays of a store of this spec (none without --replay-epochs), each chunked by one epoch x
    chunk_rows positions (one chunk each per replay unit)."""
    if spec.replay is None:
        return []
    grad = ["replay/grad/direction"] if spec.gradient_stride else []
    return ["replay/maps", "replay/stats"] + grad + ["replay/sample", "replay/record", "replay/done"]


def pack_replay(spec: CacheSpec, maps: dict[int, np.ndarray], norms: dict[int, np.ndarray],
                grad: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
    """One replay unit's maps {layer: (r, H, W)}, norms {layer: (r,)} and gradients ((r, 3, G, G), (r,)) as the
    values of the store's arrays {name: (r, ...)}."""
    encoded = {i: encode_maps(maps[i], spec.map_dtype) for i in spec.layer_indices}
    norms = {i: np.asarray(norms[i], dtype=np.float32) for i in spec.layer_indices}
    out: dict[str, np.ndarray] = {}
    if grad is not None:
        out["replay/grad/direction"] = grad[0].astype(np.float16, copy=False)
    r = len(next(iter(norms.values())))
    out["replay/maps"] = np.concatenate([stored.reshape(r, -1) for stored, _ in encoded.values()], axis=1)
    stats = [norms[i] for i in spec.layer_indices] + [s for _, s in encoded.values() if s is not None]
    out["replay/stats"] = np.stack(stats + ([grad[1]] if grad is not None else []), axis=1).astype(np.float32)
    return out


def replay_reads(spec: CacheSpec, layers: Sequence[int], grad: bool) -> list[str]:
    """The arrays `unpack_replay` needs for `layers` (and gradients), besides record and done."""
    return ["replay/maps", "replay/stats"] + (["replay/grad/direction"] if grad else [])


def unpack_replay(spec: CacheSpec, layers: Sequence[int], values: dict[str, np.ndarray], grad: bool
                  ) -> tuple[dict[int, np.ndarray], tuple | None]:
    """({layer: maps (r, H, W) float16}, (direction (r, 3, G, G), norm (r,)) or None) from the arrays `replay_reads`
    names, read for r positions: the inverse of pack_replay."""
    stats, flat = values["replay/stats"], values["replay/maps"]
    column = {name: stats[:, c] for c, name in enumerate(replay_stat_columns(spec))}
    where = {i: (offset, h, w) for i, offset, h, w in replay_pixels(spec)}
    maps = {}
    for i in layers:
        offset, h, w = where[i]
        maps[i] = decode_maps(flat[:, offset:offset + h * w].reshape(-1, h, w), column.get(f"scale_{i}"))
    return maps, (values["replay/grad/direction"], column["grad_norm"]) if grad else None


def create_replay_arrays(group: zarr.Group, spec: CacheSpec) -> None:
    """The replay arrays (E epochs x M positions), chunked by one epoch x chunk_rows positions: one replay unit."""
    e, m, r = spec.replay.epochs, spec.replay.samples, spec.replay.chunk_rows
    pixels = replay_pixels(spec)
    p = sum(h * w for _, _, h, w in pixels)
    group.create_array("replay/maps", shape=(e, m, p), chunks=(1, r, p), dtype=spec.map_dtype,
                       fill_value=map_fill(spec), compressors=map_compressors(spec.map_dtype),
                       dimension_names=("epoch", "position", "pixel"),
                       attributes={"layers": [list(x) for x in pixels]}, overwrite=True)
    columns = replay_stat_columns(spec)
    group.create_array("replay/stats", shape=(e, m, len(columns)), chunks=(1, r, len(columns)), dtype="float32",
                       fill_value=np.nan, compressors=small_compressors(4),
                       dimension_names=("epoch", "position", "stat"), attributes={"columns": list(columns)},
                       overwrite=True)
    if spec.gradient_stride:
        g = spec.gradient_size
        group.create_array("replay/grad/direction", shape=(e, m, 3, g, g), chunks=(1, r, 3, g, g), dtype="float16",
                           fill_value=np.nan, compressors=map_compressors("float16"),
                           dimension_names=("epoch", "position", "channel", "y_grad", "x_grad"), overwrite=True)
    for name, dtype, fill, size in (("sample", "int32", -1, 4), ("record", "uint64", 0, 8), ("done", "bool", False, 1)):
        group.create_array(f"replay/{name}", shape=(e, m), chunks=(1, r), dtype=dtype, fill_value=fill,
                           compressors=small_compressors(size), dimension_names=("epoch", "position"), overwrite=True)


def create_arrays(group: zarr.Group, spec: CacheSpec, files: Sequence[str]) -> None:
    """Every array of a new store, as the layout above says (the spec attribute is written after, by the store)."""
    n, r = spec.n_rows, spec.chunk_rows
    for layer in spec.layers:
        group.create_array(
            f"maps/{layer.index}", shape=(n, layer.height, layer.width), chunks=(r, layer.height, layer.width),
            dtype=spec.map_dtype, fill_value=map_fill(spec), compressors=map_compressors(spec.map_dtype),
            dimension_names=("row", *grid_dims(layer)), overwrite=True,
        )
        if spec.map_dtype == "uint8":
            group.create_array(f"scales/{layer.index}", shape=(n,), chunks=(r,), dtype="float32", fill_value=np.nan,
                               compressors=small_compressors(4), dimension_names=("row",), overwrite=True)
        group.create_array(
            f"norms/{layer.index}", shape=(n,), chunks=(r,), dtype="float32", fill_value=np.nan,
            compressors=small_compressors(4), dimension_names=("row",), overwrite=True,
        )
    group.create_array(
        "letterbox", shape=(n, width := len(spec.letterbox.columns)), chunks=(r, width), dtype="float32",
        fill_value=np.nan,
        compressors=small_compressors(4), dimension_names=("row", "field"),
        attributes={"columns": list(spec.letterbox.columns)}, overwrite=True,
    )
    group.create_array("done", shape=(n,), chunks=(r,), dtype="bool", fill_value=False,
                       compressors=small_compressors(1), dimension_names=("row",), overwrite=True)
    files_arr = group.create_array("files", shape=(n,), chunks=(r,), dtype=str, fill_value="",
                                   dimension_names=("row",), overwrite=True)
    files_arr[:] = np.asarray(files, dtype=object)
    if spec.gradient_stride:
        g = spec.gradient_size
        group.create_array("grad/direction", shape=(n, 3, g, g), chunks=(r, 3, g, g), dtype="float16",
                           fill_value=np.nan, compressors=map_compressors("float16"),
                           dimension_names=("row", "channel", "y_grad", "x_grad"), overwrite=True)
        group.create_array("grad/norm", shape=(n,), chunks=(r,), dtype="float32", fill_value=np.nan,
                           compressors=small_compressors(4), dimension_names=("row",), overwrite=True)
    if spec.replay is not None:
        create_replay_arrays(group, spec)
