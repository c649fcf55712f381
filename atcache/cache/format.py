"""The cache's on-disk format: the frozen spec (written into the store's root attributes, checked on every open),
the codecs and the encoding of maps (the arrays themselves: atcache.cache.layout). The store schema, format version 3,
the one this atcache writes and reads (a store of any other version is refused on open: `check_format_version`):

Layout (N rows = images of one split, in ultralytics' order; R = chunk_rows; per layer i of spec.layers, H x W its
map size; dimension names in brackets, stored as each array's zarr `dimension_names`):
    maps/<i>       (N, H, W) float16   normalised attention map A  [row, y_<i>, x_<i>]  chunks (R, H, W), fill NaN
                             or uint8  (--dtype uint8: q = round(255 sqrt(A / max A)), fill 0; see encode_maps)
    scales/<i>     (N,)      float32   uint8 only: max A of each map   [row]           chunks (R,),      fill NaN
    norms/<i>      (N,)      float32   ||a||_2 before normalisation    [row]           chunks (R,),      fill NaN
    letterbox      (N, 7)    float32   columns spec.LETTERBOX_COLUMNS (attrs["columns"]), read by name  [row, field]
    files          (N,)      string    image path relative to the dataset root  [row]
    done           (N,)      bool      row written (set only after its data)    [row]
    attrs["atcache"]                   the CacheSpec (format_version, layers, ...)
With --replay-epochs (E epochs of M samples, R' = replay chunk_rows; P = sum over layers of H x W), in group `replay`,
one chunk per array per replay unit (five objects, six with gradients, whatever the number of layers):
    replay/maps    (E, M, P) float16 or uint8, each view's layers flattened and concatenated in spec.layers order
                   (attrs["layers"]: [index, offset, H, W] per layer; encoded as maps/<i>)  [epoch, position, pixel]
    replay/stats   (E, M, K) float32   columns attrs["columns"] (replay_stat_columns): norm_<i> per layer, scale_<i>
                   per layer (uint8), grad_norm (--gradient)  [epoch, position, stat]
    replay/sample (int32), replay/record (uint64), replay/done (bool)  (E, M)  [epoch, position]   chunks (1, R'...)
    (record: the fingerprint of the augmented image (3, H, W) uint8 over its C-order bytes b of length n,
    FINGERPRINT "crc32c-halves" = crc32c(b[:n//2]) | crc32c(b[n//2:]) << 32, recorded as spec.replay.fingerprint; a
    store whose records were fingerprinted otherwise is refused on open: `check_fingerprint`)
With --gradient (S = spec.gradient_stride >= 1, G = imgsz / S), in group `grad` (and, with --replay-epochs, the same
per replayed view in `replay/grad/direction` (E, M, 3, G, G) [epoch, position, channel, y_grad, x_grad] chunks
(1, R', 3, G, G), and the grad_norm column of `replay/stats`, x being the augmented view and L on that view's labels):
    grad/direction (N, 3, G, G) float16   unit-L2 direction of the teacher's input gradient J_T = dL/dx, avg-pooled
                                          by S  [row, channel, y_grad, x_grad]   chunks (R, 3, G, G), fill NaN
    grad/norm      (N,)         float32   ||pooled J_T||_2 (J_T = norm * direction)  [row]   chunks (R,), fill NaN
    x: the row's letterboxed image as the maps' teacher sees it, RGB in [0, 1]; L: ultralytics' detection loss of that
    image alone on its labels letterboxed the same way, the teacher unfused in eval mode, gains spec.gradient_gains
    (see atcache.attention.gradient). A spec without gradient_stride (older stores) reads as 0: no gradients.

Within a group a dimension name has one size everywhere (each layer's grid has its own y_<i>, x_<i>), so the store
opens as it is with xarray: `xr.open_datatree(path, engine="zarr")`, `xr.open_zarr(path, group="maps")`.

Nothing but zarr nodes sits in the hierarchy (zarr, xarray and dask see no foreign key): the builders' ownership
records (atcache.cache.claims) live where zarr never lists: the creator's record is an attribute of the root
`zarr.json` (created atomically, replaced by the spec once the store is complete), and each running builder's claim
(one file: the ranges of units it owns) is a file under `done/atcache-locks/` (inside an array's prefix, next to its
chunks under `done/c/`).

Row-chunk k (rows k*R .. (k+1)*R) is the unit of writing, resuming and sharding: every array is chunked by R rows
along axis 0, so one builder writing chunk k touches exactly one chunk file of each array and two builders with
disjoint chunk ranges never read-modify-write the same file. Each chunk carries a crc32c checksum. A replay unit
(epoch e, positions k*R' .. (k+1)*R') is written whole, its `replay/done` chunk (all True) last; zarr stores no chunk
that is all fill value, so the `replay/done/c/<e>/<k>` keys present are the done units (read by a listing).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from atcache.config import MAP_DTYPES  # noqa: F401  (the dtypes a store holds; build-cache checks them)
from atcache.errors import AtcacheError

FORMAT_VERSION = 3  # the one store format written and read: a replay unit is one chunk of maps, stats, sample, record,
# done; per-layer dimension names y_<i>, x_<i>; ownership records out of the zarr hierarchy
# The letterbox array's columns, the one definition (the store writes them as the array's `columns` attribute).
LETTERBOX_COLUMNS = ("h0", "w0", "h", "w", "pad_top", "pad_left", "ratio")

# How replay/record fingerprints an augmented image (atcache.train.replay.fingerprint): 64 bits from hardware CRC32C over
# each half, 0.15 ms at 640 (a training loader checks every sample). Recorded in ReplaySpec, checked on open.
FINGERPRINT = "crc32c-halves"

# Fields that may differ between two specs of the same cache (informational only).
INFORMATIONAL = ("created", "atcache_version", "ultralytics_version", "torch_version", "teacher_path", "data_yaml")


@dataclass(frozen=True)
class LayerSpec:
    """One cached teacher layer: its module index in `model.model`, stride, channels and map size."""

    index: int
    stride: int
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class Letterbox:
    """How an image becomes the teacher's input: ultralytics' load_image (long side -> imgsz) then padding."""

    resize: str = "long_side_to_imgsz"
    interpolation: str = "INTER_LINEAR"
    pad: str = "center"  # ultralytics LetterBox(center=True): pad split evenly, top/left get the smaller half
    pad_value: int = 114
    columns: tuple[str, ...] = LETTERBOX_COLUMNS


@dataclass(frozen=True)
class LetterboxTable:
    """The stored letterbox of every row, read by column name: `table["pad_top"]` is (N,) float32 (see
    LETTERBOX_COLUMNS); `values` (N, len(columns)) is the array as stored."""

    values: np.ndarray
    columns: tuple[str, ...] = LETTERBOX_COLUMNS

    def __post_init__(self):
        missing = [c for c in LETTERBOX_COLUMNS if c not in self.columns]
        if missing or self.values.ndim != 2 or self.values.shape[1] != len(self.columns):
            raise ValueError(f"letterbox array of shape {self.values.shape} with columns {list(self.columns)} lacks "
                             f"{missing or 'a column per name'}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[:, self.columns.index(name)]

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows) -> "LetterboxTable":
        """The table of the given rows only."""
        return LetterboxTable(self.values[rows], self.columns)

    def row(self, r: int) -> dict[str, float]:
        """One row as {column: value}."""
        return dict(zip(self.columns, self.values[r].tolist()))


# ultralytics training settings that shape the augmented images (recorded with replay arrays, checked by training)
AUGMENT_KEYS = ("epochs", "close_mosaic", "mosaic", "mixup", "cutmix", "copy_paste", "copy_paste_mode", "scale",
                "translate", "degrees", "shear", "perspective", "fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v", "bgr")


@dataclass(frozen=True)
class ReplaySpec:
    """The replay arrays: the teacher's maps on exactly the augmented images seeded training sees, for `epochs` epochs
    of `samples` samples (ultralytics' training dataset, whose image list hashes to `files_sha256`), stored per epoch
    in that epoch's training order (EpochSampler(samples, aug_seed)), chunked by `chunk_rows` positions."""

    epochs: int
    aug_seed: int
    samples: int
    chunk_rows: int
    files_sha256: str
    augment: dict  # AUGMENT_KEYS -> the value the build used
    fingerprint: str = FINGERPRINT  # of each augmented image (replay/record): always FINGERPRINT (checked on open)

    @property
    def chunks_per_epoch(self) -> int:
        return -(-self.samples // self.chunk_rows)


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the cached values; two stores with equal specs hold equal data."""

    layers: tuple[LayerSpec, ...]
    imgsz: int
    p: float
    kind: str
    eps: float
    teacher_sha256: str
    teacher_weights_sha256: str
    teacher_name: str
    split: str
    dataset_fingerprint: str
    n_rows: int
    chunk_rows: int
    map_dtype: str = "float16"
    letterbox: Letterbox = field(default_factory=Letterbox)
    format_version: int = FORMAT_VERSION
    teacher_path: str = ""
    data_yaml: str = ""
    atcache_version: str = ""
    ultralytics_version: str = ""
    torch_version: str = ""
    created: str = ""
    replay: ReplaySpec | None = None  # --replay-epochs: maps of every augmented view, see ReplaySpec
    gradient_stride: int = 0  # --gradient: pooling stride of the stored input gradients; 0: none stored
    gradient_gains: dict | None = None  # --gradient: the loss gains {"box", "cls", "dfl"} the gradients were taken with

    @property
    def gradient_size(self) -> int:
        """G: the stored gradient's height and width (imgsz / gradient_stride); 0 without gradients."""
        return self.imgsz // self.gradient_stride if self.gradient_stride else 0

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.layers)

    def layer(self, index: int) -> LayerSpec:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"layer {index} is not in this cache (cached layers: {list(self.layer_indices)})")

    def stamped(self) -> "CacheSpec":
        """A copy with the creation time set to now (UTC)."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return dataclasses.replace(self, created=now)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["replay"] is None:  # a store without replay arrays reads (and is written) as before they existed
            del d["replay"]
        if not d["gradient_stride"]:  # nor one without gradients
            del d["gradient_stride"], d["gradient_gains"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "CacheSpec":
        """The spec stored in a cache (`where`, for messages); one of another format version, or whose replay records
        are fingerprinted otherwise than FINGERPRINT, is refused in one line."""
        d = dict(d)
        check_format_version(d, where)
        check_fingerprint(d, where)
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        lb = dict(d.get("letterbox", {}))
        if "columns" in lb:
            lb["columns"] = tuple(lb["columns"])
        d["letterbox"] = Letterbox(**lb)
        if d.get("replay") is not None:
            d["replay"] = ReplaySpec(**d["replay"])
        d["gradient_stride"] = int(d.get("gradient_stride") or 0)  # an older store: no gradients
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def differences(self, other: "CacheSpec") -> list[str]:
        """Human-readable 'field: ours vs theirs' for every field that determines the data and differs."""
        out = []
        a, b = self.to_dict(), other.to_dict()
        for key in list(a) + [k for k in b if k not in a]:
            if key in INFORMATIONAL:
                continue
            if a.get(key) != b.get(key):
                out.append(f"{key}: {_short(a.get(key))} vs {_short(b.get(key))}")
        return out


def check_format_version(d: dict[str, Any], where: str = "") -> None:
    """The one check of a stored spec's format version: any other than FORMAT_VERSION (older or newer) is refused in
    one line naming the store, its version, the one this atcache reads and the rebuild command."""
    found = d.get("format_version") if isinstance(d, dict) else None
    if found != FORMAT_VERSION:
        written = f"store format {found}" if found is not None else "an unknown store format (no format_version)"
        raise AtcacheError(f"{_cache(where)} was written in {written}; this atcache reads format {FORMAT_VERSION}: "
                           f"{_rebuild(where)}")


def check_fingerprint(d: dict[str, Any], where: str = "") -> None:
    """A stored spec's replay records must be fingerprinted as this atcache computes them (FINGERPRINT); another kind
    is refused in one line with the rebuild command (a spec without the field predates it: blake2b records)."""
    replay = d.get("replay") if isinstance(d, dict) else None
    found = replay.get("fingerprint", "blake2b") if isinstance(replay, dict) else FINGERPRINT
    if found != FINGERPRINT:
        raise AtcacheError(f"{_cache(where)} holds replay records fingerprinted with {found!r}; this atcache computes "
                           f"{FINGERPRINT!r}: {_rebuild(where)}")


def _cache(where: str) -> str:
    return f"cache {where}" if where else "this cache"


def _rebuild(where: str) -> str:
    return f"rebuild it with `atcache build-cache ... --out {where or '<cache>'} --overwrite` (same settings)"


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


@dataclass(frozen=True)
class ChunkData:
    """The rows of one row-chunk, ready to write: maps[layer] (r, H, W) f16, norms[layer] (r,), letterbox (r, columns)."""

    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    letterbox: np.ndarray
    ok: np.ndarray  # (r,) bool: rows whose image was read; the others stay NaN and not done
    grad_direction: np.ndarray | None = None  # (r, 3, G, G) float16: stores with gradients (spec.gradient_stride)
    grad_norm: np.ndarray | None = None  # (r,) float32


# ---------------------------------------------------------------------- codecs and arrays
def map_compressors(dtype: str = "float16") -> list:
    """float16: bit-shuffled LZ4 (fp16 mantissas barely compress with byte shuffle); uint8: zstd-9 without shuffle
    (a trained teacher's replay views at 640: 9.73 KB of maps per view, within 0.3% of the best chain of Zarr v3
    codecs, 2.4% under bitshuffle, 12.5% under lz4 + bitshuffle; pipelines/README.md); then a crc32c checksum."""
    if dtype == "uint8":
        return [BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.noshuffle, typesize=1), Crc32cCodec()]
    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=2), Crc32cCodec()]




def encode_maps(maps: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored maps, per-map scales or None) for maps A (r, H, W) >= 0: float16 as they are; uint8 in the square-root
    domain, q = round(255 sqrt(A / max A)) with max A per map as its scale (NaN rows: q 0, scale NaN). Chosen by
    measurement on a trained teacher: min cosine to the source 0.99999 per layer, linear uint8 0.99995."""
    if dtype == "float16":
        return maps.astype(np.float16, copy=False), None
    x = np.asarray(maps, dtype=np.float32)
    scale = x.reshape(len(x), -1).max(1) if x.size else np.zeros(len(x), np.float32)
    safe = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)[:, None, None]
    q = np.round(255.0 * np.sqrt(np.clip(np.nan_to_num(x / safe), 0.0, 1.0))).astype(np.uint8)
    return q, scale.astype(np.float32)


def decode_maps(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """float16 maps from what `encode_maps` stored (uint8 maps are A = scale (q / 255)^2)."""
    if scales is None:
        return np.asarray(stored)
    q = np.asarray(stored, dtype=np.float32) / 255.0
    return (np.asarray(scales, dtype=np.float32).reshape(-1, *([1] * (q.ndim - 1))) * q * q).astype(np.float16)


def small_compressors(typesize: int) -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=typesize), Crc32cCodec()]


def grid_dims(layer: LayerSpec) -> tuple[str, str]:
    """The dimension names of a layer's map grid (H, W): unique per layer, since layers differ in size and a
    dimension name has one size within a group (xarray)."""
    return f"y_{layer.index}", f"x_{layer.index}"


def map_fill(spec: CacheSpec):
    return np.nan if spec.map_dtype == "float16" else 0
