"""`atcache demo`: the whole pipeline on the embedded synthetic dataset, offline, on a CPU in minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from atcache.build import BuildConfig, build_cache
from atcache.synthetic import make_demo_data
from atcache.voc import prepare_voc


def train_teacher(model: str, data_yaml: Path, project: Path, epochs: int, imgsz: int, device: str) -> Path:
    """Briefly train the teacher with plain ultralytics and return its best.pt (a real user checkpoint)."""
    from ultralytics import YOLO

    YOLO(model).train(
        data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=16, workers=2, device=device, project=str(project),
        name="teacher", exist_ok=True, plots=False, amp=device != "cpu", verbose=False, seed=0, deterministic=True,
    )
    return project / "teacher" / "weights" / "best.pt"


def run_demo(out: Path, images: int, imgsz: int, teacher: str, teacher_epochs: int, device: str, quick: bool,
             student: str = "yolo11n.yaml", student_epochs: int = 3) -> Iterator[str]:
    """Generate VOC-format data, convert it with prepare-voc, train a teacher briefly, build its cache, then train
    the student from the cache (the teacher is not loaded for that)."""
    if quick:
        images, imgsz = min(images, 40), min(imgsz, 64)
        teacher_epochs, student_epochs = min(teacher_epochs, 1), min(student_epochs, 1)
    out = Path(out).resolve()
    devkit = make_demo_data(out / "data", images=images, size=max(2 * imgsz, 96), seed=0)
    yield f"data: {images} synthetic images in VOCdevkit format at {devkit}"
    data_yaml = prepare_voc(devkit, out / "data" / "VOC")
    yield f"prepare-voc: {data_yaml}"
    if teacher_epochs > 0 and not teacher.endswith(".pt"):
        t0 = time.perf_counter()
        teacher = str(train_teacher(teacher, data_yaml, out, teacher_epochs, imgsz, device))
        yield f"teacher: {teacher_epochs} epoch(s) in {time.perf_counter() - t0:.0f}s -> {teacher}"
    cache = out / "teacher_cache.zarr"
    report = build_cache(BuildConfig(
        teacher=teacher, data=str(data_yaml), out=str(cache), split="train", imgsz=imgsz, batch=16, device=device,
        workers=2, overwrite=True, chunk_rows=64,
    ))
    yield f"build-cache: {report.summary()}"
    yield from (f"warning: {w}" for w in report.warnings)
    if student_epochs > 0:
        from atcache.store import CacheStore
        from atcache.train import DistillSettings, train_student

        layers = tuple((i, i) for i in CacheStore.open(cache).spec.layer_indices)
        t0 = time.perf_counter()
        trainer = train_student(
            DistillSettings(mode="cache", cache=str(cache), layers=layers),
            {"model": student, "data": str(data_yaml), "epochs": student_epochs, "imgsz": imgsz, "batch": 16,
             "device": device, "project": str(out), "name": "student", "exist_ok": True, "plots": False, "seed": 0},
        )
        yield (f"train-from-cache: {student} {student_epochs} epoch(s) in {time.perf_counter() - t0:.0f}s -> "
               f"{trainer.best} (results: {trainer.csv})")
