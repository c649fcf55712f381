"""ultralytics, prepared in one place: every atcache module that needs ultralytics imports its names from here.

Before the first ultralytics import this sets YOLO_OFFLINE (unless the user set it), YOLO_CONFIG_DIR when a run asked
for its own (`prepare(config_dir)`), and a local copy of the font ultralytics would otherwise download. Names load on
first use (PEP 562), so `import atcache.yolo` itself imports neither torch nor ultralytics; `prepare()` imports it. Also here: loading a model
(the teacher, or a student for visualize) from a checkpoint or a model YAML. `atcache.yolo.trainer`: DetectionTrainer's
private steps and the trainer fields atcache rewrites (AdaptedDetectionTrainer and its hooks). `atcache.yolo.images`:
the teacher's input by ultralytics' own code (split listing, load_image, LetterBox, Format, check_image on a copy).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atcache.errors import AtcacheError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")

# name -> ultralytics module that defines it (the only ultralytics imports in atcache)
_NAMES = {
    "DEFAULT_CFG": "ultralytics.utils", "DEFAULT_CFG_DICT": "ultralytics.utils", "LOGGER": "ultralytics.utils",
    "USER_CONFIG_DIR": "ultralytics.utils", "get_cfg": "ultralytics.cfg", "smart_value": "ultralytics.cfg",
    "check_cfg": "ultralytics.cfg",
    "YOLO": "ultralytics", "DetectionTrainer": "ultralytics.models.yolo.detect",
    "DetectionModel": "ultralytics.nn.tasks", "yaml_model_load": "ultralytics.nn.tasks",
    "load_checkpoint": "ultralytics.nn.tasks", "unwrap_model": "ultralytics.utils.torch_utils",
    "YOLODataset": "ultralytics.data.dataset", "build_yolo_dataset": "ultralytics.data.build",
    "check_det_dataset": "ultralytics.data.utils", "IMG_FORMATS": "ultralytics.data.utils",
    "exif_size": "ultralytics.data.utils",
    "img2label_paths": "ultralytics.data.utils", "imread": "ultralytics.utils.patches",
    "get_split_fraction": "ultralytics.data.utils", "colorstr": "ultralytics.utils",
    **{n: "ultralytics.data.augment" for n in ("Albumentations", "Compose", "CopyPaste", "CutMix", "Format", "LetterBox",
                                               "MixUp", "Mosaic", "RandomFlip", "RandomHSV", "RandomPerspective")},
}
__all__ = ["prepare", "ultralytics_attr", "ultralytics_version", "load_model", "LoadedModel", "with_sampler", *_NAMES]
_ready = False


def prepare(config_dir: str | Path | None = None) -> None:
    """Set YOLO_OFFLINE (unless the user set it) and, before ultralytics' first import, YOLO_CONFIG_DIR = config_dir;
    then import ultralytics and copy a local font into its config dir.

    ultralytics reads both variables at import time; its dataset check calls check_font("Arial.ttf"), which downloads
    even when offline unless the font is in its config dir. Importing it here, before torch does any work, also lets
    ultralytics set its thread settings (OMP_NUM_THREADS) as a plain ultralytics run has them, so atcache's numbers
    equal one process to the next."""
    global _ready
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if config_dir is not None and "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(Path(config_dir).resolve())
    if not _ready:
        from ultralytics.utils import USER_CONFIG_DIR

        _install_font(USER_CONFIG_DIR)
        _ready = True


def ultralytics_attr(module: str, name: str):
    """`name` from ultralytics' `module`, with the environment prepared first."""
    if not _ready:
        prepare()
    return getattr(importlib.import_module(module), name)


def ultralytics_version() -> str:
    return ultralytics_attr("ultralytics", "__version__")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:3] if x.isdigit())


def with_sampler(loader, sampler):
    """The same ultralytics InfiniteDataLoader (dataset, batch size, workers, collate, seeding: what ultralytics chose),
    drawing its indices from `sampler`; call before the first batch. ultralytics < 8.4.158 starts the loader's
    iterator (and its workers) in the constructor: that unused iterator is shut down first."""
    started = getattr(loader, "iterator", None)
    if started is not None:
        if _version_tuple(ultralytics_version()) >= (8, 4, 158):
            raise RuntimeError("the loader has started; set its sampler before the first batch")
        if hasattr(started, "_shutdown_workers"):  # torch's multi-process iterator; the in-process one holds nothing
            started._shutdown_workers()
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return type(loader)(
        dataset=loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
        generator=loader.generator, drop_last=loader.drop_last, **extra,
    )


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'atcache.yolo' has no attribute {name!r}")
    return ultralytics_attr(_NAMES[name], name)


def _install_font(config_dir: Path) -> None:
    """Copy matplotlib's DejaVuSans.ttf as the fonts ultralytics looks for, where they are missing."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        target = config_dir / name
        if not target.exists() and source.exists():
            shutil.copyfile(source, target)


YAML_INIT_SEED = 0


@dataclass
class LoadedModel:
    """A loaded model in eval mode with where it came from and checksums of its file and weights."""

    model: nn.Module
    path: str
    name: str
    file_sha256: str
    weights_sha256: str


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over parameter/buffer names and bytes: equal hashes mean equal teachers, wherever the file lives."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve_model_yaml(spec: str) -> Path:
    """A model YAML path, or a bare ultralytics name like 'yolo11n.yaml' looked up in the installed package."""
    p = Path(spec)
    if p.is_file():
        return p.resolve()
    check_yaml = ultralytics_attr("ultralytics.utils.checks", "check_yaml")

    try:
        return Path(check_yaml(spec)).resolve()
    except Exception:
        import re

        unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", spec)  # yolo11n.yaml -> yolo11.yaml (scale from name)
        try:
            return Path(check_yaml(unified)).resolve()
        except Exception:
            raise AtcacheError(f"teacher {spec} does not exist; pass a trained checkpoint .pt or a model YAML") from None


def load_model(spec: str | Path, nc: int = 80, device: torch.device | str = "cpu", fuse: bool = True) -> LoadedModel:
    """The teacher in eval mode on `device`; `.pt` -> its weights, `.yaml` -> seeded random init with `nc` classes."""
    import torch

    spec = str(spec)
    suffix = Path(spec).suffix.lower()
    if suffix == ".pt":
        if not Path(spec).is_file():
            raise AtcacheError(f"teacher {spec} does not exist; pass the path of your trained checkpoint (e.g. runs/detect/train/weights/best.pt)")
        load_checkpoint = ultralytics_attr("ultralytics.nn.tasks", "load_checkpoint")

        try:
            model, _ = load_checkpoint(spec, device="cpu", fuse=False)
        except Exception as e:
            raise AtcacheError(f"teacher {spec} is not a loadable ultralytics checkpoint: {first_line(e)}") from e
        path, name = str(Path(spec).resolve()), Path(getattr(model, "yaml", {}).get("yaml_file", spec)).stem
        sha = file_sha256(spec)
    elif suffix in (".yaml", ".yml"):
        DetectionModel, yaml_model_load = __getattr__("DetectionModel"), __getattr__("yaml_model_load")

        yaml_path = _resolve_model_yaml(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(YAML_INIT_SEED)
            try:
                cfg = yaml_model_load(spec if Path(spec).is_file() else Path(spec).name)  # scale from the name
                cfg["nc"] = nc
                model = DetectionModel(cfg=cfg, verbose=False)
            except Exception as e:
                raise AtcacheError(f"teacher YAML {spec} does not build a detection model: {e}") from e
        path, name = str(yaml_path), Path(spec).stem
        sha = hashlib.sha256(yaml_path.read_bytes() + f"\nscale={name}\nseed={YAML_INIT_SEED}".encode()).hexdigest()
    else:
        raise AtcacheError(f"teacher {spec} is neither a checkpoint (.pt) nor a model YAML (.yaml)")
    model = model.float().eval()
    wsha = weights_sha256(model)
    if fuse and hasattr(model, "fuse"):
        model = model.fuse(verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model.to(device).eval(), path=path, name=name, file_sha256=sha, weights_sha256=wsha)


def save_random_teacher(cfg: str, path: str | Path, nc: int = 20, seed: int = 0, imgsz: int = 640) -> Path:
    """A random teacher saved as an ultralytics checkpoint with He-normal convs, so its activations stay O(1) through
    the network (the stock init shrinks them to ~1e-16 by layer 22, where every map is ~eps): realistic maps for
    benchmarks and tests when no trained teacher is at hand."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = __getattr__("DetectionModel")(cfg, nc=nc, verbose=False)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.half(), "train_args": {"imgsz": imgsz}, "epoch": -1}, path)
    return Path(path)
