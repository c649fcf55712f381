"""`atcache demo`: the whole pipeline on the embedded synthetic dataset, offline, on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from atcache.build import BuildConfig, build_cache
from atcache.synthetic import make_demo_data
from atcache.voc import prepare_voc


def run_demo(out: Path, images: int, imgsz: int, teacher: str, device: str, quick: bool) -> Iterator[str]:
    """Generate VOC-format data, convert it with prepare-voc, and build the teacher's cache; yields report lines."""
    if quick:
        images, imgsz = min(images, 40), min(imgsz, 64)
    out = Path(out)
    devkit = make_demo_data(out / "data", images=images, size=max(2 * imgsz, 96), seed=0)
    yield f"data: {images} synthetic images in VOCdevkit format at {devkit}"
    data_yaml = prepare_voc(devkit, out / "data" / "VOC")
    yield f"prepare-voc: {data_yaml}"
    cache = out / "teacher_cache.zarr"
    report = build_cache(BuildConfig(
        teacher=teacher, data=str(data_yaml), out=str(cache), split="train", imgsz=imgsz, batch=16, device=device,
        workers=2, overwrite=True, chunk_rows=64,
    ))
    yield f"build-cache: {report.summary()}"
    yield from (f"warning: {w}" for w in report.warnings)
