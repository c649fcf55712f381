"""Running the demo's jobs two at a time on a CPU, and saying beforehand how long they will take.

`Slots` hands out a fixed number of slots first come, first served: the parent's own jobs (teacher training, cache
builds) take one while they run, each student (a child process, atcache.tools.measure) one in a thread of its own.
Every job's interval is recorded, so that a report can say what ran alongside each measurement."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Seconds per image-epoch on the box the demo was timed on (2-core x86_64 CPU, 1 torch thread per process, imgsz 128,
# batch 16, workers 2, one job at a time), validation and the child's start included: YOLO11 cost ~ a + b * GFLOPs
# (fitted to the YOLO11s teacher and the YOLO11n student), AT students' extra per image, and the builds per image.
GFLOPS = {"n": 6.6, "s": 21.7, "m": 71.5, "l": 87.6, "x": 196.0}
TRAIN_S = (0.0084, 0.00104)  # (a, b): seconds per image-epoch = a + b * GFLOPs
AT_EXTRA_S = {"plain": 0.0, "warp": 0.004, "static": 0.003, "replay": 0.002}  # + per image-epoch; online: the teacher
ONLINE_FORWARD = 0.2  # online: + this x the teacher's train cost per image-epoch (a forward, no backward)
BUILD_S = 0.02  # static build, per image and teacher GFLOP/21.7 (a forward of the teacher)
REPLAY_BUILD_S = 0.0065  # replay build, per augmented view and teacher GFLOP/21.7
START_S = 8.0  # a child process's start: imports, model, dataset
PARALLEL_SLOWDOWN = 1.25  # each of two jobs at once on 2 cores (their data loaders share the cores)
REFERENCE_IMGSZ = 128


def parallel_slots(device: str, cores: int | None = None) -> tuple[int, int | None]:
    """(jobs at a time, torch threads per job): two at once, each with cores // 2 threads, on a CPU with >= 2 cores;
    one at a time (threads left to ultralytics) on a GPU or a 1-core CPU."""
    cores = cores or os.cpu_count() or 1
    if str(device).strip().lower() != "cpu" or cores < 2:
        return 1, None
    return 2, cores // 2


class Slots:
    """`n` slots, granted in the order asked for; `job(name)` holds one around a block, `submit` around a call in a
    thread. `intervals` holds every finished job's (start, end) in seconds since `t0`."""

    def __init__(self, n: int, t0: float | None = None):
        self.n, self.t0 = n, time.perf_counter() if t0 is None else t0
        self._free, self._queue, self._cond = n, [], threading.Condition()
        self.intervals: dict[str, tuple[float, float]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, tuple[bool, object]] = {}

    def _enqueue(self) -> object:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        return ticket

    @contextmanager
    def _hold(self, name: str, ticket: object):
        with self._cond:
            self._cond.wait_for(lambda: self._free > 0 and self._queue[0] is ticket)
            self._queue.pop(0)
            self._free -= 1
            self._cond.notify_all()
        start = time.perf_counter() - self.t0
        try:
            yield
        finally:
            self.intervals[name] = (start, time.perf_counter() - self.t0)
            with self._cond:
                self._free += 1
                self._cond.notify_all()

    def job(self, name: str):
        """A context manager holding a slot (waiting for one, after those asked for before) around a block."""
        return self._hold(name, self._enqueue())

    def submit(self, name: str, fn: Callable[[], object]) -> None:
        """Ask for a slot now (served in the order asked) and run fn() in it in a thread; `result(name)` waits."""
        ticket = self._enqueue()

        def work():
            try:
                with self._hold(name, ticket):
                    self._results[name] = (True, fn())
            except BaseException as e:  # re-raised in the caller's thread by result()
                self._results[name] = (False, e)

        thread = threading.Thread(target=work, name=f"atcache-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()

    def result(self, name: str):
        self._threads[name].join()
        ok, value = self._results[name]
        if not ok:
            raise value  # type: ignore[misc]
        return value

    def alongside(self, name: str, min_s: float = 1.0) -> dict[str, float]:
        """The other jobs that ran while `name` did, with the seconds they overlapped (at least `min_s`)."""
        a0, a1 = self.intervals[name]
        out = {}
        for other, (b0, b1) in self.intervals.items():
            overlap = min(a1, b1) - max(a0, b0)
            if other != name and overlap >= min_s:
                out[other] = round(overlap, 1)
        return out


@dataclass(frozen=True)
class Estimate:
    seconds: float
    text: str


def _gflops(model: str) -> float:
    """YOLO11 GFLOPs at 640 from the scale letter of 'yolo11s.yaml' / 'yolo11s.pt' (s when none is found)."""
    stem = Path(model).stem.lower()
    return GFLOPS.get(stem[-1] if stem and stem[-1] in GFLOPS else "s", GFLOPS["s"])


def estimate_demo(images: int, imgsz: int, teacher: str, teacher_epochs: int, student: str, student_epochs: int,
                  device: str, slots: int, threads: int | None, cores: int | None = None) -> Estimate:
    """How long `atcache demo` will take: the constants above (one 2-core CPU), scaled by the image count, epochs,
    imgsz^2 and the models' GFLOPs, then the jobs laid out in the demo's order over `slots` (two at a time: each
    PARALLEL_SLOWDOWN slower; threads > 1: faster by threads^0.6, a guess for these small models)."""
    cores = cores or os.cpu_count() or 1
    if str(device).strip().lower() != "cpu":
        return Estimate(0.0, "estimate: none for a GPU (the constants are measured on a 2-core CPU); on a GPU the "
                             "students run one at a time")
    n = round(images * 0.78)  # prepare-voc's train split
    area = (imgsz / REFERENCE_IMGSZ) ** 2
    t_cost, s_cost = (TRAIN_S[0] + TRAIN_S[1] * _gflops(m) for m in (teacher, student))
    t_scale = _gflops(teacher) / GFLOPS["s"]
    speed = (threads or 1) ** 0.6
    slow = PARALLEL_SLOWDOWN if slots > 1 else 1.0
    data_s = 0.05 * images
    teacher_s = teacher_epochs * n * t_cost * area
    build_s = n * BUILD_S * t_scale * area + (student_epochs * n * REPLAY_BUILD_S * t_scale * area if student_epochs else 0)
    students = {}
    for mode in ("plain", "online", "warp", "replay"):
        per = s_cost + (ONLINE_FORWARD * t_cost if mode == "online" else AT_EXTRA_S[mode])
        students[mode] = START_S + student_epochs * n * per * area / speed if student_epochs > 0 else 0.0
    if slots > 1:
        # plain alongside the teacher; online alongside the builds; then warp and replay in the two slots
        t1 = max(teacher_s * slow, students["plain"] * slow) if teacher_epochs else max(build_s, students["plain"]) * slow
        online_end = students["online"] * slow
        build_end = build_s * slow
        warp_end = build_end + students["warp"] * slow
        replay_start = max(build_end, min(online_end, warp_end))
        total = data_s + t1 + max(online_end, warp_end, replay_start + students["replay"] * slow)
        how = f"{slots} jobs at a time, {threads} torch thread{'s' if threads != 1 else ''} each"
    else:
        total = data_s + teacher_s + build_s + sum(students.values())
        how = "one job at a time"
    text = (f"estimate: about {int(total // 60)} min {int(total % 60):02d} s on this {cores}-core CPU ({how}; teacher "
            f"{teacher_s:.0f}s, builds {build_s:.0f}s, students "
            f"{', '.join(f'{k} {v:.0f}s' for k, v in students.items())} alone; constants from a 2-core x86_64 box)")
    return Estimate(total, text)
