"""What the commands besides build-cache and train* are asked to do, as frozen dataclasses whose fields carry their
defaults and --help texts (atcache.config.opt). Free of torch and ultralytics, unlike the tools themselves, so that the
command line reads them without importing those; each tool module imports its config from here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from atcache.config import (AUTO_DEVICE, CACHE_HELP, DEFAULT_AT_WEIGHT, DEFAULT_LAYERS, LAYERS_CLI, ONE_DEVICE_HELP,
                            STUDENT_MODES, TARGET_MODES, Checked, comma_text, opt)
from atcache.errors import AtcacheError


STUDY_MODES = tuple(m for m in STUDENT_MODES if m != "grad_online")  # the study's default: grad_online = grad, slower


def _numbers(kind):
    """(parse, format) of a comma-separated list of numbers (study --seeds, --at-weights)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(x) for x in text.split(","))
        except ValueError as e:
            raise AtcacheError(f"--seeds and --at-weights take comma-separated numbers ({e})") from None
        if kind is float and not all(math.isfinite(v) and v >= 0 for v in values):
            raise AtcacheError(f"--at-weights {text!r}: every weight must be a finite number >= 0")
        return values

    return parse, comma_text


def _modes(text: str) -> tuple[str, ...]:
    """study --modes: known student modes, comma-separated."""
    unknown = [m for m in text.split(",") if m not in STUDENT_MODES]
    if unknown:
        raise AtcacheError(f"--modes {unknown[0]!r} is unknown; choose among {', '.join(STUDENT_MODES)}")
    return tuple(text.split(","))


def _mode_counts(text: str) -> tuple[tuple[str, int], ...]:
    """study --mode-seeds: mode=count pairs, comma-separated (e.g. online=3,static=3)."""
    out = []
    for part in filter(None, text.split(",")):
        mode, _, count = part.partition("=")
        _modes(mode)
        if not count.isdigit() or int(count) < 1:
            raise AtcacheError(f"--mode-seeds {part!r} is not mode=count with a count >= 1 (e.g. online=3)")
        out.append((mode, int(count)))
    return tuple(out)


def _files(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


@dataclass(frozen=True)
class DemoDataConfig:
    """What `atcache make-demo-data` writes (the defaults of atcache.data.synthetic.make_demo_data)."""

    out: str = opt("data/demo", "Folder that receives VOCdevkit/.")
    images: int = opt(400, "Number of images over all VOC years and sets.")
    size: int = opt(160, "Long side of the images in pixels (varies down to 0.75x).")
    seed: int = opt(0, "Seed; the same arguments write the same files.")

    def __post_init__(self):
        if self.images < 5 or self.size < 16:
            raise AtcacheError("--images must be at least 5 and --size at least 16")


@dataclass(frozen=True)
class VocConfig:
    """What `atcache prepare-voc` converts (the arguments of atcache.data.voc.convert_voc)."""

    devkit: str = opt(help="The input folder: a VOCdevkit (with VOC2007/ and/or VOC2012/), or a folder an annotation "
                           "tool exported in Pascal VOC format (images/ or JPEGImages/ + Annotations/, or images and "
                           "XML in one folder; ImageSets/Main/{train,val,test}.txt optional), or split folders train/, "
                           "valid/ (or val/) and optional test/ of such folders, as Roboflow exports them.")
    out: str = opt(help="Output dataset root: images/, labels/ and the data YAML (VOC.yaml for a VOCdevkit, data.yaml "
                        "for an export) are written here.")
    classes: tuple[str, ...] = opt((), "Comma-separated class names in id order (default: every class in the XML, "
                                       "sorted; the 20 VOC names for a VOCdevkit of VOC classes). An object of another "
                                       "class stops the conversion.", cli=(_files, comma_text))
    skip_classes: tuple[str, ...] = opt((), "Comma-separated classes whose objects are dropped (the summary counts "
                                            "them).", cli=(_files, comma_text))
    keep_difficult: bool = opt(False, "Keep the objects marked <difficult>1 (by default they are dropped, as "
                                      "ultralytics' VOC conversion does).")
    val_fraction: float = opt(0.2, "Share of an export's images that validate, in [0, 1), where no split "
                                   "folders or ImageSets/Main/{train,val,test}.txt define the split.")
    seed: int = opt(0, "Seed of that split: the same images and seed give the same split.")


@dataclass(frozen=True)
class InspectConfig(Checked):
    """How `atcache inspect` looks at a cache (the cache itself: the positional CACHE or --cache)."""

    verify: bool = opt(False, "Decode every chunk and check its crc32c; exit 1 if any is corrupted.")
    compare: str | None = opt(None, "Another cache: per-layer cosine and AT distance over common images.")
    workers: int | None = opt(None, "dask threads (default: one per core).", low=1)
    scheduler: str | None = opt(None, "A dask.distributed scheduler address (tcp://host:8786) to compute on.")


@dataclass(frozen=True)
class VisualizeConfig(Checked):
    """What `atcache visualize` draws (the keyword arguments of atcache.tools.visualize.visualize_cache)."""

    data: str = opt(help="Ultralytics detection data YAML (the one the cache was built on).")
    out: str = opt(help="Folder for the PNGs.")
    images: int = opt(4, "How many images (spread over the cache).", low=1)
    files: tuple[str, ...] = opt((), "Comma-separated images instead (paths relative to the dataset root).",
                                 cli=(_files, comma_text))
    student: str | None = opt(None, "A student .pt (or YAML): adds its maps and |S-T| with the AT distance.")
    epoch: int | None = opt(None, "Replay arrays: the augmented images of this cached epoch with the teacher's maps on "
                                  "them.")


@dataclass(frozen=True)
class FidelityConfig(Checked):
    """What `atcache fidelity` compares, on which data and pipeline."""

    cache: str = opt(help=CACHE_HELP)
    teacher: str = opt(help="The teacher the cache was built with (.pt or the same YAML).")
    data: str = opt(help="Ultralytics detection data YAML (the one the cache was built on).")
    batches: int = opt(8, "Training batches to compare.", low=1)
    batch: int = opt(16, "Images per batch.", low=1)
    targets: str = opt("warp", "warp (default augmentations), static or replay, as in train-from-cache.",
                       choices=TARGET_MODES)
    device: str = opt(AUTO_DEVICE, ONE_DEVICE_HELP)
    seed: int = opt(0, "Seed of the sample order and the augmentations.")
    gradient: bool = opt(False, "Also compare the cached input gradients J_T (build-cache --gradient; --targets replay "
                                "or static) with the live teacher's on the same view: cosine and norm ratio.")
    hyp: dict = field(default_factory=dict)  # ultralytics augmentation overrides (mosaic=0, hsv_v=0, ...)


@dataclass(frozen=True)
class DemoConfig(Checked):
    """What `atcache demo` runs (the keyword arguments of atcache.tools.demo.run_demo)."""

    out: str = opt("runs/demo", "Run folder for data, cache and ultralytics settings.")
    images: int = opt(200, "Synthetic images to generate.", low=5)
    imgsz: int = opt(128, "Image size.", low=32)
    teacher: str = opt("yolo11s.yaml", "Teacher: a model YAML (trained here first) or a ready .pt.")
    teacher_epochs: int = opt(20, "Epochs to train a YAML teacher before caching it (0: random init).", low=0)
    student: str = opt("yolo11n.yaml", "Student trained from the cache: a model YAML or a .pt.")
    student_epochs: int = opt(15, "Epochs of every student (plain, cache, replay, online; 0: stop after the cache).",
                              low=0)
    batch: int = 16
    jobs: int | None = opt(None, "Runs at a time (default: 2 on a CPU with >= 2 cores, 1 on a GPU).", low=1)
    device: str = opt(AUTO_DEVICE, ONE_DEVICE_HELP)
    quick: bool = opt(False, "Tiny sizes, for tests.")


@dataclass(frozen=True)
class StudyOutput:
    """Where `atcache study` runs (not part of what the study depends on, StudyConfig)."""

    out: str = opt("runs/accuracy", "Run folder (data, teacher, caches, students, accuracy.json/.md).")
    ledger: str = opt("", "JSON file of the finished students' records: read to reuse them and rewritten after each "
                          "(keeps a long study's progress outside OUT).")


@dataclass(frozen=True)
class StudyConfig(Checked):
    """Everything a study run depends on (written into its JSON)."""

    images: int = opt(1600, "Synthetic images to generate (~22% become the validation split).")
    imgsz: int = opt(160, "Image size of teacher and students.")
    teacher: str = opt("yolo11s.yaml", "Teacher model YAML, trained here on the whole training split.")
    teacher_epochs: int = opt(15, "Teacher epochs (a teacher trained with the same settings in OUT is reused).")
    student: str = opt("yolo11n.yaml", "Student model YAML.")
    student_images: int = opt(300, "Training images the students see (the first N of the split).")
    student_epochs: int = opt(10, "Epochs of every student run.")
    seeds: tuple[int, ...] = opt((0, 1, 2), "Comma-separated seeds (each run's seed and --aug-seed).",
                                 cli=_numbers(int))
    modes: tuple[str, ...] = opt(STUDY_MODES, "Comma-separated modes among plain, online, static, warp, replay, grad "
                                              "(gradient AT from replay targets), grad_online, flip (flip-symmetry "
                                              "term).",
                                 cli=(_modes, comma_text))
    mode_seeds: tuple[tuple[str, int], ...] = opt((), "Comma-separated mode=count: these modes run on the first count "
                                                      "of --seeds only (e.g. online=3,static=3).",
                                                  cli=(_mode_counts, lambda v: ",".join(f"{m}={n}" for m, n in v)))
    at_weights: tuple[float, ...] = opt((DEFAULT_AT_WEIGHT,), "Comma-separated weights of each mode's term (--at-weight; "
                                                              "grad: --gradient-weight, flip: --flip-weight); every "
                                                              "mode but plain runs once per value.", cli=_numbers(float))
    layers: tuple[int, ...] = opt(DEFAULT_LAYERS, "Comma-separated layers cached and distilled (student layer = "
                                                  "teacher layer).", cli=LAYERS_CLI)
    batch: int = opt(16, "Batch size.", low=1)
    device: str = opt(AUTO_DEVICE, ONE_DEVICE_HELP)


@dataclass(frozen=True)
class BenchConfig(Checked):
    """What `atcache bench` measures, and on what."""

    out: str = opt("runs/bench", "Run folder (data links, cache, training runs, bench.json).")
    data: str = opt("", "Data YAML to take the images from (default: synthetic VOC-format data).")
    teacher: str = opt("yolo11m.yaml", "Teacher: a checkpoint .pt or a model YAML (random init).")
    student: str = opt("yolo11s.yaml", "Student: a model YAML or a checkpoint .pt.")
    layers: tuple[int, ...] = opt(DEFAULT_LAYERS, "Comma-separated teacher layers (student layers of the same index).",
                                  cli=LAYERS_CLI)
    imgsz: int = opt(640, "Image size.")
    batch: int = opt(64, "Batch size (build, inference and training).", low=1)
    steps: int = opt(30, "Measured training steps per trainer and round, inside its first epoch (after the warm-up).",
                     low=1)
    warmup: int = opt(5, "Training steps run before measuring.", low=0)
    images: int = opt(0, "Training images used (0: warmup + steps + 2 batches, so one epoch holds the measured steps).")
    workers: int = opt(8, "DataLoader workers (ultralytics uses none on a CPU).")
    device: str = opt(AUTO_DEVICE, ONE_DEVICE_HELP)
    repeats: int = opt(3, "Alternating build / inference passes; medians are reported.")
    loader_samples: int = 200
    rounds: int = opt(3, "Interleaved rounds of the trainers (rotated order); medians and spread are reported.")
    gradient: bool = opt(False, "Also measure gradient-based AT and the flip term: trainers grad (J_T from a replay "
                                "cache), grad_online and flip, the build with --gradient, bytes per image and view.")

    @property
    def images_needed(self) -> int:
        """The fewest images whose first epoch holds warmup + steps step intervals."""
        return self.batch * (self.warmup + self.steps + 2)

    @property
    def n_images(self) -> int:
        return self.images or self.images_needed
