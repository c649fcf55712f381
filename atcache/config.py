"""What the user asked for, as frozen dataclasses with one serialized form (JSON) that every child process receives:
build shard processes and dask tasks get a BuildConfig, measurement processes and ultralytics' DDP workers a
DistillSettings. No torch, no ultralytics: the CLI, the dask client and the children all import it cheaply."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from atcache.errors import AtcacheError

# The reference setup: YOLO11m -> YOLO11s on VOC 07+12, these six layers (strides 16, 32, 16, 8, 16, 32), p = 2.
DEFAULT_LAYERS = (6, 8, 13, 16, 19, 22)
DEFAULT_P = 2.0  # exponent p of the attention map sum_c |F_c|^p
DEFAULT_KIND = "sum_p"
DEFAULT_IMGSZ = 640
DEFAULT_CHUNK_ROWS = 256
DEFAULT_WINDOW = 4  # streaming: row-chunks whose samples are shuffled together
DEFAULT_AT_WEIGHT = 1.0
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # DataLoader workers decoding images for the teacher
AUTO_DEVICE = ""  # --device default: CUDA device 0 when there is one, else the CPU (the CLI resolves it)
# The two fields of DistillSettings: which trainer (`mode`) and, for the cache trainer, which targets (`targets`).
TRAIN_MODES = ("plain", "cache", "online")
TARGET_MODES = ("warp", "static", "replay")
# The one enumeration of student modes the tools (demo, bench, study) run and report; each is one (mode, targets)
# pair of DistillSettings (atcache.tools.plans.plan builds the settings).
STUDENT_MODES = ("plain", "online", "static", "warp", "replay")
STUDENT_MODE_FIELDS = {  # student mode -> (DistillSettings.mode, DistillSettings.targets)
    "plain": ("plain", "warp"),
    "online": ("online", "warp"),
    "static": ("cache", "static"),
    "warp": ("cache", "warp"),
    "replay": ("cache", "replay"),
}


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
    imgsz: int = DEFAULT_IMGSZ
    batch: int = 64
    device: str = AUTO_DEVICE  # one device, or a list (0,1,2,3): one build process per device
    p: float = DEFAULT_P
    kind: str = DEFAULT_KIND
    workers: int = DEFAULT_WORKERS
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
    p: float = DEFAULT_P  # online mode; a cache brings its own p, kind and eps
    kind: str = DEFAULT_KIND
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


@dataclass(frozen=True)
class RunSettings:
    """The ultralytics side of a training run `atcache train*` starts (its model=, data=, epochs=, ... arguments)."""

    epochs: int = 100
    imgsz: int = DEFAULT_IMGSZ  # must equal the cache's
    batch: int = 64
    device: str = AUTO_DEVICE  # one device, or a list (0,1) for DDP
    project: str = "runs/detect"
    name: str = ""  # '' -> the command's name (train, train-from-cache, train-online)


@dataclass(frozen=True)
class DemoConfig:
    """What `atcache demo` runs (the keyword arguments of atcache.tools.demo.run_demo)."""

    out: str = "runs/demo"
    images: int = 200
    imgsz: int = 128
    teacher: str = "yolo11s.yaml"
    teacher_epochs: int = 20  # a YAML teacher is trained this long before it is cached (0: random init)
    student: str = "yolo11n.yaml"
    student_epochs: int = 15  # every student run: plain, from the cache, online (0: stop after the cache)
    device: str = AUTO_DEVICE
    quick: bool = False  # tiny sizes, for tests


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
    return check_shard(i, n)


def check_shard(i: int, n: int) -> tuple[int, int]:
    """Shard i of n exists (0 <= i < n), or one line saying how to write it."""
    if not (n >= 1 and 0 <= i < n):
        raise AtcacheError(f"--shard {i}/{n} is out of range; use i/n with 0 <= i < n")
    return i, n


def check_targets(targets: str, rect: bool = False) -> None:
    """Targets from a cache: a known --targets mode, and no rect=True batches (the cached maps are of square
    letterboxed images)."""
    if targets not in TARGET_MODES:
        raise AtcacheError(f"--targets {targets!r} is unknown; choose warp, static or replay")
    if rect:
        raise AtcacheError("rect=True training is not supported with cached targets; drop rect")


def check_replay(cache: str, replay, given: dict, instead: str = "use --targets warp or static") -> dict:
    """Replay arrays (`CacheSpec.replay`) of `cache`, and ultralytics settings `given` for a run on them: the
    augmentation they were made with, `given` filled in from it; a cache without them, or a given setting that
    differs from the one they were made with, is refused in one line naming the way out."""
    if replay is None:
        raise AtcacheError(f"cache {cache} has no replay arrays; build them with `atcache build-cache ... "
                           f"--replay-epochs E` (or {instead})")
    for key, value in replay.augment.items():
        if key in given and given[key] != value:
            raise AtcacheError(
                f"{key}={given[key]} differs from the replay arrays of cache {cache}, built with {key}={value}; leave "
                f"{key} out (it is taken from the cache) or rebuild the cache with `atcache build-cache ... "
                f"--replay-epochs {replay.epochs} {key}={given[key]}`")
    return {**replay.augment, **given}
