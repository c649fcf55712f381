"""Measure one training run in a process of its own: time per step, img/s, peak memory, epoch times, final metrics.

A separate process gives each trainer a clean peak-memory reading (CUDA max allocated on a GPU, peak RSS on a CPU)
and the same starting state; `atcache demo` and `atcache bench` both compare trainers through it.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atcache.errors import AtcacheError

METRIC_KEYS = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)")


class EnoughSteps(Exception):
    """Raised from a batch callback once a step-limited measurement has what it needs (skips val and saving)."""


def measure_training(settings, overrides: dict, steps: int | None = None, warmup: int = 0,
                     loader_samples: int = 0, threads: int | None = None) -> dict:
    """Train with `train_student(settings, overrides)` in a child process and return its figures.

    steps=None trains to the end (final metrics of best.pt included); otherwise it stops after warmup + steps
    batches. loader_samples > 0 also times the training dataset's samples and, for cached targets, the targets alone.
    threads: the child's torch (and OpenMP) threads; None leaves them to ultralytics (OMP_NUM_THREADS, default 1).
    The child's output is kept back; its last error line becomes the message when it fails.
    """
    with tempfile.TemporaryDirectory(prefix="atcache-measure-") as tmp:
        result = Path(tmp) / "result.json"
        run = json.dumps({"overrides": overrides, "steps": steps, "warmup": warmup, "loader_samples": loader_samples,
                          "threads": threads})
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
        proc = subprocess.run([sys.executable, "-m", "atcache.tools.measure", settings.to_json(), run, str(result)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0 or not result.is_file():
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            last = lines[-1].removeprefix("atcache: error: ") if lines else "no message"
            raise AtcacheError(f"{settings.mode} training run failed (exit {proc.returncode}): {last}")
        return json.loads(result.read_text())


def step_figures(step_ends: list[tuple[int, float]], batch: int, warmup: int) -> dict:
    """img/s from the median time between consecutive batch ends of one epoch, after `warmup` batches."""
    steps = [b[1] - a[1] for a, b in zip(step_ends, step_ends[1:]) if a[0] == b[0]][warmup:]
    if not steps:
        return {"steps": 0, "median_step_s": None, "mean_step_s": None, "img_per_s": None}
    median = statistics.median(steps)
    return {"steps": len(steps), "median_step_s": median, "mean_step_s": statistics.mean(steps),
            "img_per_s": batch / median, "step_s": [round(s, 5) for s in steps]}


def _epoch_seconds(results_csv: Path) -> list[float]:
    """Seconds of each epoch (training + validation) from ultralytics' cumulative `time` column."""
    if not Path(results_csv).is_file():
        return []
    with open(results_csv) as f:
        times = [float(r["time"]) for r in ({k.strip(): v for k, v in row.items()} for row in csv.DictReader(f))]
    return [b - a for a, b in zip([0.0] + times, times)]


def _peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def _time_loader(dataset, samples: int, device, batch: int) -> dict:
    """Samples/s of the training dataset (image, augmentation, targets or the views they render from) and the cached
    targets alone, both by the one warp renderer: targets/s one view at a time on the CPU (`warped`, what a dataset
    built without `pieces` renders in its loader), and of whole batches on the training device."""
    import numpy as np
    import torch

    from atcache.train.render import PIECES_KEY, collate_pieces
    from atcache.train.datasets import AtcacheDataset
    from atcache.train.targets import VIEW_KEY

    rng = np.random.default_rng(0)
    index = rng.integers(0, len(dataset), samples)
    t0 = time.perf_counter()
    for i in index:
        dataset[int(i)]
    figures = {"samples": samples, "samples_per_s": samples / (time.perf_counter() - t0)}
    if isinstance(dataset, AtcacheDataset) and dataset.at_mode == "warp":
        views = [dataset.transforms(dataset.get_image_and_label(int(i))).pop(VIEW_KEY) for i in index]
        t0 = time.perf_counter()
        for view in views:
            dataset.at_cache.warped(view)
        figures["targets_per_s"] = samples / (time.perf_counter() - t0)
        figures["layers_per_target"] = len(dataset.at_cache.layers)
        if dataset.at_pieces and len(views) >= batch:
            renderer = dataset.at_cache.batch_renderer(device)
            batches = [collate_pieces([dataset.at_cache.pieces(v) for v in views[a:a + batch]])
                       for a in range(0, len(views) - batch + 1, batch)]
            renderer.render(batches[0])  # warm-up (allocations, kernels)
            cuda = torch.device(device).type == "cuda"
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for pieces in batches:
                renderer.render(pieces)
            if cuda:
                torch.cuda.synchronize(device)
            figures["rendered_targets_per_s"] = len(batches) * batch / (time.perf_counter() - t0)
            figures["render_batch"] = batch
            figures["renderer_bytes"] = renderer.nbytes()
    figures["has_targets"] = isinstance(dataset, AtcacheDataset) and dataset.at_cache is not None
    figures["ships_views"] = PIECES_KEY if isinstance(dataset, AtcacheDataset) and dataset.at_pieces else None
    return figures


def _child(settings_json: str, run_json: str, result_path: str) -> None:
    """`python -m atcache.tools.measure SETTINGS RUN RESULT`: the settings as DistillSettings JSON, the run as JSON."""
    from atcache.yolo import prepare

    prepare()
    import torch

    from atcache.config import DistillSettings
    from atcache.train.trainer import AtcacheTrainer

    request = json.loads(run_json)
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    settings = DistillSettings.from_json(settings_json)
    overrides, steps, warmup = request["overrides"], request["steps"], request["warmup"]
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    cuda = trainer.device.type == "cuda"
    step_ends: list[tuple[int, float]] = []

    def on_train_start(t):
        if cuda:
            torch.cuda.reset_peak_memory_stats(t.device)

    def on_batch_end(t):
        if cuda:
            torch.cuda.synchronize(t.device)
        step_ends.append((t.epoch, time.perf_counter()))
        intervals = len(step_ends) - len({e for e, _ in step_ends})  # within epochs only
        if steps is not None and intervals >= warmup + steps:
            raise EnoughSteps

    trainer.add_callback("on_train_start", on_train_start)
    trainer.add_callback("on_train_batch_end", on_batch_end)
    t0 = time.perf_counter()
    finished = True
    try:
        trainer.train()
    except EnoughSteps:
        finished = False
    wall = time.perf_counter() - t0
    result = {
        "mode": settings.mode, "targets": settings.targets if settings.mode == "cache" else None,
        "at_weight": settings.at_weight if settings.mode != "plain" else None,
        "batch": trainer.batch_size, "workers": trainer.train_loader.num_workers,
        "train_images": len(trainer.train_loader.dataset), "wall_s": wall, "finished": finished,
        **step_figures(step_ends, trainer.batch_size, warmup if not finished else min(warmup, 1)),
        "peak_mem_gb": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else _peak_rss_gb(),
        "mem_kind": "cuda_max_allocated" if cuda else "peak_rss",
        "device": device_name(trainer.device),
        "torch_threads": torch.get_num_threads(),
        "save_dir": str(trainer.save_dir),
    }
    if finished:
        epochs = _epoch_seconds(trainer.csv)
        result["epoch_s"] = epochs
        result["mean_epoch_s"] = statistics.mean(epochs[1:] or epochs) if epochs else None
        result["metrics"] = {k: float(v) for k, v in (trainer.metrics or {}).items() if k in METRIC_KEYS}
        result["best"] = str(trainer.best)
    if request["loader_samples"]:
        result["loader"] = _time_loader(trainer.train_loader.dataset, request["loader_samples"], trainer.device,
                                        trainer.batch_size)
    Path(result_path).write_text(json.dumps(result))


def device_name(device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'CPU: x86_64, 2 cores'."""
    import platform

    import torch

    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


if __name__ == "__main__":
    try:
        _child(*sys.argv[1:4])
    except AtcacheError as e:  # the parent reports the last stderr line
        sys.stderr.write(f"atcache: error: {e}\n")
        sys.exit(2)
