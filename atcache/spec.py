"""The frozen description of a cache: written into the store's root attributes, checked on every open."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
# The letterbox array's columns, the one definition (the store writes them as the array's `columns` attribute).
LETTERBOX_COLUMNS = ("h0", "w0", "h", "w", "pad_top", "pad_left", "ratio")

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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheSpec":
        d = dict(d)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"cache format version {version} is not supported (this atcache reads {FORMAT_VERSION})")
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        lb = dict(d.get("letterbox", {}))
        if "columns" in lb:
            lb["columns"] = tuple(lb["columns"])
        d["letterbox"] = Letterbox(**lb)
        if d.get("replay") is not None:
            d["replay"] = ReplaySpec(**d["replay"])
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


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."
