"""What the user asked for, as frozen dataclasses with one serialized form (JSON) that every child process receives:
build shard processes and dask tasks get a BuildConfig, measurement processes and ultralytics' DDP workers a
DistillSettings. No torch, no ultralytics: the CLI, the dask client and the children all import it cheaply."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from atcache.errors import AtcacheError

DEFAULT_LAYERS = (6, 8, 13, 16, 19, 22)  # the seed's YOLO11 layers: strides 16, 32, 16, 8, 16, 32
DEFAULT_CHUNK_ROWS = 256
DEFAULT_WINDOW = 4  # streaming: row-chunks whose samples are shuffled together
DEFAULT_AT_WEIGHT = 1.0
TRAIN_MODES = ("plain", "cache", "online")
TARGET_MODES = ("warp", "static", "replay")


def _tuples(x):
    """JSON lists back to the tuples the frozen configs hold (layers, shard, layer pairs)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class JsonConfig:
    """The one serialized form of a frozen config: `to_json` in the parent, `from_json` in the child."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str):
        return cls(**{k: _tuples(v) for k, v in json.loads(text).items()})


@dataclass(frozen=True)
class BuildConfig(JsonConfig):
    """What `atcache build-cache` was asked to do."""

    teacher: str
    data: str
    out: str
    split: str = "train"
    layers: tuple[int, ...] = DEFAULT_LAYERS
    imgsz: int = 640
    batch: int = 64
    device: str = "cpu"  # one device, or a list (0,1,2,3): one build process per device
    p: float = 2.0
    kind: str = "sum_p"
    workers: int = 4
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    skip_bad: bool = False
    progress: bool = True
    repair: bool = False  # with --resume: recompute the row-chunks whose stored data fails to decode
    break_locks: bool = False  # take over row-chunks another builder claimed (only when that builder is dead)
    scheduler: str = ""  # dask.distributed: 'local:N' or a scheduler address; '' = this machine
    retries: int = 2  # dask retries of a failed build task (a lost worker)
    replay_epochs: int = 0  # also cache the maps of every augmented view of this many epochs of seeded training
    aug_seed: int = 0  # the replay's --aug-seed
    augment: tuple[tuple[str, object], ...] = ()  # ultralytics augmentation settings (key, value) for the replay
    dtype: str = "float16"  # stored maps: float16, or uint8 (square-root domain, a scale per map; store.encode_maps)


@dataclass(frozen=True)
class DistillSettings(JsonConfig):
    """What atcache adds to an ultralytics run; `layers` pairs (student layer, cache/teacher layer)."""

    mode: str = "plain"
    cache: str = ""
    teacher: str = ""
    targets: str = "warp"
    at_weight: float = DEFAULT_AT_WEIGHT
    layers: tuple[tuple[int, int], ...] = ()
    p: float = 2.0  # online mode; a cache brings its own p, kind and eps
    kind: str = "sum_p"
    ram_budget_gb: float | None = None
    stream: bool | None = None  # None: stream the cache from disk when it needs more than ram_budget_gb
    shuffle_window: int = DEFAULT_WINDOW  # streaming: chunks whose samples are shuffled together
    aug_seed: int | None = None  # each sample's augmentation and each epoch's order from (aug_seed, epoch, index)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.layers)

    @property
    def source_layers(self) -> tuple[int, ...]:
        return tuple(t for _, t in self.layers)


def parse_layers(text: str, pairs: bool = False):
    """'6,8,13' -> (6, 8, 13); with `pairs`, (student, cache) pairs: '6,8' -> ((6, 6), (8, 8)), '4:6,6:8' -> ((4, 6),
    (6, 8)) (student layer 4 learns cache layer 6, ...)."""
    items = [x for x in text.replace(" ", "").split(",") if x]
    try:
        if pairs:
            out = tuple((int(s), int(t or s)) for s, _, t in (item.partition(":") for item in items))
        else:
            out = tuple(int(x) for x in items)
    except ValueError:
        what = ("a list like 6,8,13 or student:cache pairs like 4:6,6:8" if pairs else
                f"a comma-separated list of layer indices, e.g. {','.join(map(str, DEFAULT_LAYERS))}")
        raise AtcacheError(f"--layers {text!r} is not {what}") from None
    if not out:
        raise AtcacheError("--layers is empty; give at least one layer index")
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n): this process fills the i-th of n disjoint chunk ranges."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise AtcacheError(f"--shard {text!r} is not of the form i/n (e.g. 0/4)") from None
    if not (n >= 1 and 0 <= i < n):
        raise AtcacheError(f"--shard {text} is out of range; use i/n with 0 <= i < n")
    return i, n
