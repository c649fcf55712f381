"""What the user asked for, as frozen dataclasses with one serialized form (JSON) that every child process receives:
build shard processes and dask tasks get a BuildConfig, measurement processes and ultralytics' DDP workers a
DistillSettings. No torch, no ultralytics: the CLI, the dask client and the children all import it cheaply."""

from __future__ import annotations

import dataclasses
import json
import math
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
# build-cache --gradient: the stored input gradient is average-pooled by this stride (1: full resolution); 8 by
# measurement (pipelines/README.md, "gradient stride"): 3 x 80 x 80 float16 = 38 KB per image at 640, and the
# student's weight gradient keeps the same cosine to the full-resolution one as at strides 4 and 16.
DEFAULT_GRADIENT_STRIDE = 8
ATTENTION_KINDS = ("sum_p", "sum", "max_p")  # a = sum_c |F_c|^p, sum_c |F_c|, max_c |F_c|^p
MAP_DTYPES = ("float16", "uint8")  # how a cache stores its maps
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # DataLoader workers decoding images for the teacher
AUTO_DEVICE = ""  # --device default: CUDA device 0 when there is one, else the CPU (atcache.devices)
# The two fields of DistillSettings: which trainer (`mode`) and, for the cache trainer, which targets (`targets`).
TRAIN_MODES = ("plain", "cache", "online")
TARGET_MODES = ("warp", "static", "replay")
# How the AT term normalises each layer's ||A_S - A_T||_2 (atcache.attention.functional.layer_at_loss): "batch" one
# norm over the whole batch / N (the reference setup's; its pull falls as 1/sqrt(batch)), "per-image" the mean of
# each image's norm (independent of batch size).
AT_NORMS = ("batch", "per-image")
# The one enumeration of student modes the tools (demo, bench, study) run and report; each is one (mode, targets)
# pair of DistillSettings and the one term it weights (atcache.tools.plans.plan builds the settings): activation AT,
# or for grad gradient-based AT alone (replay targets; grad_online: the teacher's J_T live), for flip the
# flip-symmetry term alone (no teacher).
STUDENT_MODES = ("plain", "online", "static", "warp", "replay", "grad", "grad_online", "flip")
STUDENT_MODE_FIELDS = {  # student mode -> (DistillSettings.mode, DistillSettings.targets)
    "plain": ("plain", "warp"),
    "online": ("online", "warp"),
    "static": ("cache", "static"),
    "warp": ("cache", "warp"),
    "replay": ("cache", "replay"),
    "grad": ("cache", "replay"),
    "grad_online": ("online", "warp"),
    "flip": ("plain", "warp"),
}


def _tuples(x):
    """JSON lists back to the tuples the frozen configs hold (layers, shard, layer pairs)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def option_name(field: dataclasses.Field) -> str:
    """The command-line option of a config field (--at-weight for at_weight, or the one `opt` names)."""
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")


def _check_value(field: dataclasses.Field, value) -> None:
    """One field's value against what its `opt` declares: one of `choices`, a finite number >= `low` (or > 0 where
    `positive`); AtcacheError naming the option and what it takes."""
    meta, name = field.metadata, option_name(field)
    if value is None or not meta:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise AtcacheError(f"{name} {value!r} is unknown; choose one of {', '.join(meta['choices'])}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        wanted = f" >= {meta['low']}" if meta.get("low") is not None else " > 0" if meta.get("positive") else ""
        raise AtcacheError(f"{name} {value} is not a finite number; give a number{wanted}")
    if meta.get("low") is not None and value < meta["low"]:
        raise AtcacheError(f"{name} {value} must be at least {meta['low']}")
    if meta.get("positive") and value <= 0:
        raise AtcacheError(f"{name} {value} is not above 0; give a number > 0")


class Checked:
    """A frozen config whose fields are checked against their `opt` declarations when it is made, so a bad value is
    refused in one line before any work starts (in the CLI, a child process and a library call alike)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))


class JsonConfig(Checked):
    """The one serialized form of a frozen config: `to_json` in the parent, `from_json` in the child."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str):
        return cls(**{k: _tuples(v) for k, v in json.loads(text).items()})


def opt(default=dataclasses.MISSING, help: str = "", *, cli=None, option: str | None = None, choices=(),
        low: float | None = None, positive: bool = False):
    """A config field that is also a command-line option: its --help text, and where the option's text differs from
    the field's value a (parse, format) pair `cli` (layers "6,8,13" <-> (6, 8, 13), shard "i/n" <-> (i, n)), and the
    option's name where it is not the field's (--ram-budget). atcache.cli.options turns these into typer options.
    `choices`, `low` (a finite number >= low) and `positive` (> 0) are checked when the config is made (`Checked`)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli, "option": option, "choices": choices,
                                                        "low": low, "positive": positive})


def comma_text(values) -> str:
    """A tuple (layers, seeds, ...) as the comma-separated text its option takes."""
    return ",".join(map(str, values))


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


LAYERS_CLI = (parse_layers, comma_text)
PAIRS_CLI = (lambda text: parse_layers(text, pairs=True) if text else (),  # '' -> () (train-from-cache: every cached layer)
             lambda pairs: ",".join(str(s) if s == t else f"{s}:{t}" for s, t in pairs))
SHARD_CLI = (parse_shard, lambda shard: "/".join(map(str, shard)))


def parse_gains(text: str) -> tuple[float, ...]:
    """'7.5,0.5,1.5' -> (7.5, 0.5, 1.5): the box, cls and dfl gains; '' -> () (ultralytics' defaults)."""
    if not text.strip():
        return ()
    try:
        gains = tuple(float(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        gains = ()
    if len(gains) != 3 or min(gains) < 0:
        raise AtcacheError(f"--gradient-gains {text!r} is not three non-negative numbers box,cls,dfl (e.g. 7.5,0.5,1.5)")
    return gains


GAINS_CLI = (parse_gains, comma_text)
AUTO_HELP = "default: CUDA device 0 if there is one, else the CPU"
ONE_DEVICE_HELP = f"cpu or a CUDA index ({AUTO_HELP})."
P_HELP = "Exponent p of the attention map sum_c |F_c|^p."
KIND_HELP = "Attention map: sum_p (the reference setup's), sum, or max_p."
CACHE_HELP = "The cache store: a .zarr folder or an fsspec URL such as s3://bucket/voc.zarr."


@dataclass(frozen=True)
class BuildConfig(JsonConfig):
    """What `atcache build-cache` was asked to do."""

    teacher: str = opt(help="Teacher: a trained ultralytics checkpoint .pt, or a model YAML (random init).")
    data: str = opt(help="Ultralytics detection data YAML.")
    out: str = opt(help="Cache store to write: a Zarr v3 folder (voc_m.zarr) or an fsspec URL (s3://bucket/voc_m.zarr).")
    split: str = opt("train", "Split of the data YAML to cache.")
    layers: tuple[int, ...] = opt(DEFAULT_LAYERS, "Teacher layer indices (model.model[i]) to cache.", cli=LAYERS_CLI)
    imgsz: int = opt(DEFAULT_IMGSZ, "Training image size (multiple of the max stride).", low=32)
    batch: int = opt(64, "Images per teacher forward pass.", low=1)
    device: str = opt(AUTO_DEVICE, "cpu, a CUDA index, or several (0,1,2,3): one shard process per device "
                                   f"({AUTO_HELP}).")
    p: float = opt(DEFAULT_P, P_HELP, positive=True)
    kind: str = opt(DEFAULT_KIND, KIND_HELP, choices=ATTENTION_KINDS)
    workers: int = opt(DEFAULT_WORKERS, "DataLoader workers decoding images (default: min(4, CPU cores)).", low=0)
    resume: bool = opt(False, "Finish an interrupted build of the same settings.")
    overwrite: bool = opt(False, "Delete an existing store at --out and rebuild it.")
    shard: tuple[int, int] = opt((0, 1), "i/n: this process fills the i-th of n disjoint chunk ranges.", cli=SHARD_CLI)
    chunk_rows: int = opt(DEFAULT_CHUNK_ROWS, "Rows per Zarr chunk: the unit of writing, resuming and sharding.", low=1)
    skip_bad: bool = opt(False, "Leave rows of unreadable images empty instead of stopping.")
    progress: bool = opt(True, "Show a progress bar.")
    repair: bool = opt(False, "With --resume: recompute the row-chunks whose stored data fails to decode (corrupted "
                              "chunks).")
    break_locks: bool = opt(False, "Take over row-chunks claimed by another builder that is known to be dead.")
    scheduler: str = opt("", "Build on dask.distributed: local:N worker processes here, or a scheduler address "
                             "tcp://host:8786.")
    retries: int = 2  # dask retries of a failed build task (a lost worker)
    replay_epochs: int = opt(0, "Also store the teacher's maps on every augmented view of this many epochs of seeded "
                                "training (train-from-cache --targets replay).", low=0)
    aug_seed: int = opt(0, "The replay's augmentation seed (train with the same --aug-seed, or let training take it "
                           "from the cache).")
    augment: tuple[tuple[str, object], ...] = ()  # ultralytics augmentation settings (key, value) for the replay
    dtype: str = opt("float16", "Stored maps: float16, or uint8 (square-root domain with a scale per map: about half "
                                "the bytes, cosine >= 0.9999).", choices=MAP_DTYPES)
    gradient: bool = opt(False, "Also store the teacher's input gradient dL/dx of every row (gradient-based AT: "
                                "direction float16 + norm), pooled by --gradient-stride.")
    gradient_stride: int = opt(DEFAULT_GRADIENT_STRIDE, "With --gradient: average-pool the gradient by this stride "
                                                        "before storing it (1 keeps full resolution).", low=1)
    gradient_gains: tuple[float, ...] = opt((), "With --gradient: the loss gains box,cls,dfl (default: "
                                                "ultralytics' defaults).", cli=GAINS_CLI)


@dataclass(frozen=True)
class DistillSettings(JsonConfig):
    """What atcache adds to an ultralytics run; `layers` pairs (student layer, cache/teacher layer)."""

    mode: str = opt("plain", choices=TRAIN_MODES)  # which trainer (no option: each command sets it)
    cache: str = opt("", CACHE_HELP)
    teacher: str = opt("", "Teacher checkpoint .pt, run forward on every augmented batch.")
    targets: str = opt("warp", "warp: align maps with mosaic/affine/flip/mixup; static: no geometric aug, exact maps; "
                               "replay: the teacher's maps on every augmented view (build-cache --replay-epochs).",
                        choices=TARGET_MODES)
    at_weight: float = opt(DEFAULT_AT_WEIGHT, "Weight of the AT loss added to the detection loss.", low=0)
    at_norm: str = opt("batch", "AT loss per layer: batch = ||A_S - A_T||_2 / N over the whole batch (the reference "
                                "setup's; its pull falls as 1/sqrt(batch)), per-image = mean of each image's norm "
                                "(independent of batch size).", choices=AT_NORMS)
    layers: tuple[tuple[int, int], ...] = opt((), "Layers to distil: 6,8,13 (same index in student and teacher or "
                                                  "cache) or student:teacher pairs 4:6,6:8. Default from a cache: all "
                                                  "cached layers.", cli=PAIRS_CLI)
    p: float = opt(DEFAULT_P, P_HELP, positive=True)  # online mode; a cache brings its own p, kind and eps
    kind: str = opt(DEFAULT_KIND, KIND_HELP, choices=ATTENTION_KINDS)
    ram_budget_gb: float | None = opt(None, "GiB of RAM the cache may take (default: half of this machine's memory); "
                                            "a larger cache is streamed from disk.", option="--ram-budget", low=0)
    stream: bool | None = opt(None, "Read the maps from disk chunk by chunk (block-shuffled order) instead of RAM. "
                                    "Default: only when the cache exceeds --ram-budget.")
    shuffle_window: int = opt(DEFAULT_WINDOW, "Streaming: chunks whose samples are shuffled together (more: closer to "
                                              "a full shuffle, more RAM per loader worker).", low=1)
    aug_seed: int | None = opt(None, "Seeded augmentation: each sample's augmentation and each epoch's order a "
                                     "function of (seed, epoch, index) alone, so runs see identical batches.")
    gradient_weight: float = opt(0.0, "Gradient-based AT (Zagoruyko & Komodakis): adds weight/2 x ||J_S - J_T||_2 / N, "
                                      "J = d(detection loss)/d(input image), the teacher's J_T computed every step "
                                      "(train-from-cache --targets static or replay: read from a build-cache --gradient "
                                      "cache).", low=0)
    gradient_stride: int | None = opt(None, "With --gradient-weight: compare J_S and J_T average-pooled by this stride "
                                            "(1: full resolution). Default: the cache's; train-online "
                                            f"{DEFAULT_GRADIENT_STRIDE}, as build-cache --gradient.", low=1)
    flip_weight: float = opt(0.0, "Flip-symmetry of input gradients: adds weight/2 x ||J(x) - flip(J(flip x))||_2 / N "
                                  "(two more student forwards and a double backward per step).", low=0)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.layers)

    @property
    def source_layers(self) -> tuple[int, ...]:
        return tuple(t for _, t in self.layers)


@dataclass(frozen=True)
class RunSettings(Checked):
    """The ultralytics side of a training run `atcache train*` starts (its model=, data=, epochs=, ... arguments)."""

    student: str = opt(help="Student: a model YAML (yolo11s.yaml, from scratch) or a checkpoint .pt.")
    data: str = opt(help="Ultralytics detection data YAML (the one the cache was built on).")
    epochs: int = opt(100, "Training epochs (train-from-cache --targets replay: the cache's unless given).", low=1)
    imgsz: int = opt(DEFAULT_IMGSZ, "Training image size (must equal the cache's).", low=32)
    batch: int = opt(64, "Batch size over all devices (-1: ultralytics' AutoBatch on a GPU).", low=-1)
    device: str = opt(AUTO_DEVICE, f"cpu, a CUDA index, or several (0,1) for DDP ({AUTO_HELP}).")
    project: str = opt("runs/detect", "Parent of the run folder (ultralytics' project).")
    name: str = opt("", "Run name (default: the command's name; ultralytics adds a number if it exists).")


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
