"""Load a model (the teacher; visualize also loads a student this way): an ultralytics checkpoint (.pt) or a model YAML
(random init with a fixed seed, for tests)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atcache.errors import AtcacheError, first_line

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
    from ultralytics.utils.checks import check_yaml

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
    spec = str(spec)
    suffix = Path(spec).suffix.lower()
    if suffix == ".pt":
        if not Path(spec).is_file():
            raise AtcacheError(f"teacher {spec} does not exist; pass the path of your trained checkpoint (e.g. runs/detect/train/weights/best.pt)")
        from ultralytics.nn.tasks import load_checkpoint

        try:
            model, _ = load_checkpoint(spec, device="cpu", fuse=False)
        except Exception as e:
            raise AtcacheError(f"teacher {spec} is not a loadable ultralytics checkpoint: {first_line(e)}") from e
        path, name = str(Path(spec).resolve()), Path(getattr(model, "yaml", {}).get("yaml_file", spec)).stem
        sha = file_sha256(spec)
    elif suffix in (".yaml", ".yml"):
        from ultralytics.nn.tasks import DetectionModel, yaml_model_load

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
    from ultralytics.nn.tasks import DetectionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DetectionModel(cfg, nc=nc, verbose=False)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.half(), "train_args": {"imgsz": imgsz}, "epoch": -1}, path)
    return Path(path)
