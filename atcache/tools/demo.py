"""`atcache demo`: the whole pipeline on the embedded synthetic dataset, offline, on a CPU in minutes: data, teacher,
cache, then the student four ways for the same budget (plain, from the cache with warp and replay targets, online AT)
and one table."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from atcache.teacher.pipeline import build_cache
from atcache.config import BuildConfig, DistillSettings
from atcache.tools import plans
from atcache.tools.schedule import Slots, estimate_demo, parallel_slots
from atcache.settings import DemoConfig

# Small data, few epochs: ultralytics' 'auto' optimizer picks AdamW lr 4e-4 for 20 classes and steps every 64 images,
# which leaves YOLO11s at mAP 0 here for many epochs. AdamW lr 4e-3, an optimizer step per batch (nbs 16), a 1-epoch
# warm-up without the bias warm-up: mAP50 0.47 in 20 epochs (a sweep on this data: lr 2e-3 0.49, SGD 1e-2 0.39 at 15
# epochs, no mosaic 0.21 at 15). The same settings for the teacher and every student.
DEMO_HYP = {"optimizer": "AdamW", "lr0": 0.004, "warmup_epochs": 1, "warmup_bias_lr": 0.0, "nbs": 16}
DEMO_MODES = ("plain", "warp", "replay", "online")  # the student modes the demo trains, in its table's order
STUDENT_RUNS = tuple(plans.report_name(m) for m in DEMO_MODES)  # their report names: plain, cache, replay, online


def train_teacher(model: str, data_yaml: Path, project: Path, epochs: int, imgsz: int, device: str,
                  batch: int = 16, on_train_start: Callable[[], None] | None = None) -> tuple[Path, dict]:
    """Briefly train the teacher with plain ultralytics; its best.pt (a real user checkpoint) and final metrics.
    on_train_start: called once the teacher's datasets are built (their label caches written), before epoch 1."""
    from atcache.yolo import YOLO

    yolo = YOLO(model)
    if on_train_start is not None:
        yolo.add_callback("on_train_start", lambda trainer: on_train_start())
    yolo.train(
        data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, workers=2, device=device, project=str(project),
        name="teacher", exist_ok=True, plots=False, amp=device != "cpu", verbose=False, seed=0, deterministic=True,
        **DEMO_HYP,
    )
    trainer = yolo.trainer
    return Path(trainer.best), {k: float(v) for k, v in (trainer.metrics or {}).items() if k.startswith("metrics/")}


def student_settings(sources: plans.Sources, modes=DEMO_MODES) -> dict[str, DistillSettings]:
    """The demo's students by report name, each from the one plan of student modes."""
    return {plans.report_name(mode): plans.plan(mode, sources).settings for mode in modes}


def run_demo(cfg: DemoConfig) -> Iterator[str]:
    """Generate VOC-format data, convert it with prepare-voc, train a teacher briefly, build its cache, then train the
    student plain, from the cache and online for the same epochs; write the comparison into OUT/demo_results.*

    On a CPU with >= 2 cores two jobs run at a time (`jobs`; None: schedule.parallel_slots), each with cores // 2
    torch threads: the plain student alongside the teacher's training, online alongside the cache builds, then the
    two cache students. Same data, seeds and epochs as one at a time, so the same accuracy; the speed columns say how
    they were measured."""
    from atcache.data.splits import split_files
    from atcache.devices import resolve_device
    from atcache.tools.measure import device_name, measure_training
    from atcache.data.synthetic import make_demo_data
    from atcache.data.voc import prepare_voc

    out, images, imgsz, teacher, teacher_epochs = Path(cfg.out), cfg.images, cfg.imgsz, cfg.teacher, cfg.teacher_epochs
    student, student_epochs, batch, jobs, device = cfg.student, cfg.student_epochs, cfg.batch, cfg.jobs, cfg.device
    if cfg.quick:
        images, imgsz = min(images, 40), min(imgsz, 64)
        teacher_epochs, student_epochs = min(teacher_epochs, 1), min(student_epochs, 1)
    out = Path(out).resolve()
    t_start = time.perf_counter()
    slots, threads = parallel_slots(device)
    if jobs is not None:
        slots, threads = max(1, jobs), (max(1, (os.cpu_count() or 1) // max(1, jobs)) if jobs > 1 else None)
    trains_teacher = teacher_epochs > 0 and not teacher.endswith(".pt")
    estimate = estimate_demo(images, imgsz, teacher, teacher_epochs if trains_teacher else 0, student, student_epochs,
                             device, slots, threads)
    yield estimate.text
    pool = Slots(slots, t_start)
    devkit = make_demo_data(out / "data", images=images, size=max(2 * imgsz, 96), seed=0)
    yield f"data: {images} synthetic images in VOCdevkit format at {devkit}"
    data_yaml = prepare_voc(devkit, out / "data" / "VOC")
    yield f"prepare-voc: {data_yaml}"
    overrides = {"model": student, "data": str(data_yaml), "epochs": student_epochs, "imgsz": imgsz, "batch": batch,
                 "device": device, "workers": 2, "project": str(out / "students"), "exist_ok": True, "plots": False,
                 "seed": 0, "deterministic": True, **DEMO_HYP}
    started: list[str] = []

    def start(name: str, settings: DistillSettings) -> None:
        """Queue one student (a child process, in a slot of its own)."""
        if student_epochs > 0 and name not in started:
            started.append(name)
            pool.submit(name, lambda: measure_training(settings, {**overrides, "name": name}, loader_samples=0,
                                                       threads=threads))

    early = student_settings(plans.Sources(), ("plain",))  # needs neither teacher nor cache
    teacher_metrics: dict = {}
    teacher_model = teacher
    if trains_teacher:
        alongside = (lambda: start("plain", early["plain"])) if slots > 1 else None
        with pool.job("teacher"):
            best, teacher_metrics = train_teacher(teacher, data_yaml, out, teacher_epochs, imgsz, device, batch,
                                                  on_train_start=alongside)
        start_s, end_s = pool.intervals["teacher"]
        yield f"teacher: {teacher} {teacher_epochs} epoch(s) in {end_s - start_s:.0f}s -> {best}"
        teacher = str(best)
    cache = out / "teacher_cache.zarr"
    replay_cache = out / "teacher_replay.zarr"  # the same maps plus every augmented view of the students' epochs
    build = BuildConfig(teacher=teacher, data=str(data_yaml), out=str(cache), split="train", imgsz=imgsz, batch=16,
                        device=device, workers=2, overwrite=True, chunk_rows=64)
    sources = plans.Sources(layers=tuple((i, i) for i in build.layers), teacher=teacher, cache=str(cache),
                            replay_cache=str(replay_cache))
    plan = student_settings(sources)
    build_slot = pool.job("build-cache")  # asked for first: the builds unblock two students
    if slots > 1:
        start("plain", plan["plain"])  # no teacher trained: at once
        start("online", plan["online"])  # needs the teacher only: alongside the builds
    with build_slot:
        report = build_cache(build)
        replay_report = build_cache(replace(build, out=str(replay_cache), replay_epochs=student_epochs)) \
            if student_epochs > 0 else None
    yield f"build-cache: {report.summary()}"
    yield from (f"warning: {w}" for w in report.warnings)
    if student_epochs <= 0:
        return
    yield f"build-cache --replay-epochs {student_epochs}: {replay_report.summary()}"
    for name in STUDENT_RUNS:
        start(name, plan[name])
    students = {}
    for name in started:
        students[name] = pool.result(name)
        start_s, end_s = pool.intervals[name]
        yield f"student {name}: {student} {student_epochs} epoch(s) in {end_s - start_s:.0f}s -> {students[name]['save_dir']}"
    students = {name: students[name] for name in STUDENT_RUNS}
    seconds = time.perf_counter() - t_start
    results = {
        "device": device_name(resolve_device(device)),
        "data": {"images": images, "train_images": students["plain"]["train_images"], "imgsz": imgsz,
                 "val_images": len(split_files(data_yaml, "val").files)},
        "teacher": {"model": teacher_model, "checkpoint": teacher, "epochs": teacher_epochs, "metrics": teacher_metrics},
        "student": {"model": student, "epochs": student_epochs, "batch": batch, "hyp": DEMO_HYP},
        "cache": {"path": str(cache), "bytes": report.store_bytes, "bytes_per_image": report.bytes_per_image,
                  "build_img_per_s": report.img_per_s},
        "replay_cache": {"path": str(replay_cache), "bytes": replay_report.store_bytes, "views": replay_report.replayed,
                         "bytes_per_view": (replay_report.store_bytes - report.store_bytes) / max(replay_report.replayed, 1),
                         "build_s": replay_report.seconds},
        "runs": students,
        "schedule": {"jobs_at_a_time": slots, "threads_per_student": threads, "cores": os.cpu_count(),
                     "intervals_s": {k: [round(a, 1), round(b, 1)] for k, (a, b) in pool.intervals.items()},
                     "alongside_s": {name: pool.alongside(name) for name in STUDENT_RUNS}},
        "estimate_s": estimate.seconds,
        "seconds": seconds,
    }
    table = _results_table(results)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "demo_results.md").write_text(table + "\n")
    yield ""
    yield from table.splitlines()
    yield ""
    yield f"results: {out / 'demo_results.md'} and {out / 'demo_results.json'} ({results['seconds']:.0f}s in all)"
    yield f"took {_minutes(seconds)} (estimated {_minutes(estimate.seconds)})"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def _measured_how(results: dict) -> str:
    """How the speed columns were measured: one student at a time, or which jobs shared the machine with each."""
    sched = results.get("schedule", {})
    if sched.get("jobs_at_a_time", 1) <= 1:
        return "students measured one at a time"
    threads = sched["threads_per_student"]
    each = "; ".join(f"{name} alongside {' and '.join(others) or 'nothing'}"
                     for name, others in sched["alongside_s"].items())
    return (f"students measured {sched['jobs_at_a_time']} jobs at a time on {sched['cores']} cores, {threads} torch "
            f"thread{'s' if threads != 1 else ''} each ({each}): the s/epoch and img/s columns are slowed by what ran "
            "alongside, compare them with each other roughly and not with runs measured one at a time")


def _results_table(results: dict) -> str:
    """The demo's comparison as a Markdown table: accuracy, speed, memory, and what the cache costs on disk."""
    runs, cache = results["runs"], results["cache"]
    mem = "peak CUDA GB" if runs["plain"]["mem_kind"] == "cuda_max_allocated" else "peak RSS GB"
    labels = {"plain": "`train` (student alone)", "cache": "`train-from-cache` (warp targets)",
              "replay": "`train-from-cache --targets replay`", "online": "`train-online` (teacher every step)"}
    replay = results["replay_cache"]
    lines = [f"| trainer | mAP50 | mAP50-95 | s/epoch | img/s | {mem} | cache |", "|---|---|---|---|---|---|---|"]
    for name in STUDENT_RUNS:
        r = runs[name]
        m = r.get("metrics", {})
        size = {"cache": f"{cache['bytes'] / 1e6:.2f} MB, {cache['bytes_per_image'] / 1e3:.1f} KB/image",
                "replay": f"{replay['bytes'] / 1e6:.2f} MB, {replay['views']} views, "
                          f"{replay['bytes_per_view'] / 1e3:.1f} KB/view"}.get(name, "-")
        lines.append(f"| {labels[name]} | {m.get('metrics/mAP50(B)', 0):.3f} | {m.get('metrics/mAP50-95(B)', 0):.3f} | "
                     f"{r['mean_epoch_s']:.1f} | {r['img_per_s']:.1f} | {r['peak_mem_gb']:.2f} | {size} |")
    t = results["teacher"]["metrics"]
    if t:
        lines.append(f"| teacher {Path(results['teacher']['model']).stem} (reference) | "
                     f"{t.get('metrics/mAP50(B)', 0):.3f} | {t.get('metrics/mAP50-95(B)', 0):.3f} | | | | |")
    d, s = results["data"], results["student"]
    lines += ["", f"{s['model']} student, {s['epochs']} epochs each, batch {s['batch']}, imgsz {d['imgsz']}, "
                  f"{d['train_images']} training images; s/epoch includes validation, img/s is the median training "
                  f"step; {_measured_how(results)}; device: {results['device']}.",
              "",
              "What this table can show: the cost of each way to distil (speed, memory, cache size) and that training "
              "from the cache runs without the teacher. What it cannot: which student is more accurate. One seed "
              f"scored on {d.get('val_images', 'a few dozen')} validation images cannot rank them: mAP differences of "
              "this size come and go between seeds; the seeded accuracy study (`atcache study`, pipelines/accuracy.sh, "
              "README 'Accuracy') measures them over seeds on a larger validation split."]
    return "\n".join(lines)
