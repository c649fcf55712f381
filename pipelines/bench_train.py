"""Stage 2 side by side: per-epoch seconds (and accuracy) of `train`, `train-from-cache` and `train-online` in one run
on one device, optionally with a sweep of --at-weight for the cached trainer.

    python pipelines/bench_train.py --data runs/demo/VOC/VOC.yaml --cache runs/demo/teacher_cache.zarr \
        --teacher runs/demo/teacher/weights/best.pt --student yolo11n.yaml --imgsz 128 --epochs 10 --device cpu

Writes a JSON report (per run: epoch seconds, mean epoch seconds after the first, final losses and mAP) to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(int(device.split(",")[0]))
    return f"CPU: {platform.processor() or platform.machine()} ({__import__('os').cpu_count()} cores)"


def run_one(name: str, settings, overrides: dict) -> dict:
    import torch

    from atcache.train import train_student

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = train_student(settings, {**overrides, "name": name, "exist_ok": True})
    wall = time.perf_counter() - t0
    with open(trainer.csv) as f:
        rows = [{k.strip(): float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    times = [r["time"] for r in rows]
    epoch_s = [times[0]] + [b - a for a, b in zip(times, times[1:])]
    last = rows[-1]
    return {
        "run": name, "mode": settings.mode, "targets": settings.targets if settings.mode == "cache" else None,
        "at_weight": settings.at_weight if settings.mode != "plain" else None,
        "epoch_s": [round(x, 2) for x in epoch_s],
        "mean_epoch_s_after_first": round(statistics.mean(epoch_s[1:]), 2) if len(epoch_s) > 1 else round(epoch_s[0], 2),
        "wall_s": round(wall, 1),
        "peak_cuda_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "final": {k: last[k] for k in last if k.startswith(("train/", "metrics/"))},
        "save_dir": str(trainer.save_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--teacher", required=True, help="the checkpoint the cache was built from (for train-online)")
    ap.add_argument("--student", default="yolo11n.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--at-weight", type=float, default=1.0)
    ap.add_argument("--sweep", default="", help="comma-separated extra --at-weight values for train-from-cache")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip: plain,cache,online")
    ap.add_argument("--project", default="runs/bench_train")
    ap.add_argument("--out", default="pipelines/results/bench_train.json")
    args = ap.parse_args()

    from atcache.env import prepare_ultralytics

    prepare_ultralytics()
    from atcache.store import CacheStore
    from atcache.train import DistillSettings

    layers = tuple((i, i) for i in CacheStore.open(args.cache).spec.layer_indices)
    overrides = {"model": args.student, "data": args.data, "epochs": args.epochs, "imgsz": args.imgsz,
                 "batch": args.batch, "device": args.device, "workers": args.workers, "plots": False,
                 "project": str(Path(args.project).resolve()), "seed": 0, "deterministic": False}
    plan = [
        ("plain", DistillSettings(mode="plain")),
        ("cache", DistillSettings(mode="cache", cache=args.cache, layers=layers, at_weight=args.at_weight)),
        ("online", DistillSettings(mode="online", teacher=args.teacher, layers=layers, at_weight=args.at_weight)),
    ]
    plan += [(f"cache_w{w}", DistillSettings(mode="cache", cache=args.cache, layers=layers, at_weight=float(w)))
             for w in (x for x in args.sweep.split(",") if x)]
    skip = set(filter(None, args.skip.split(",")))
    report = {"device": device_name(args.device), "args": vars(args), "runs": []}
    for name, settings in plan:
        if name in skip:
            continue
        report["runs"].append(run_one(name, settings, overrides))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    for r in report["runs"]:
        m = r["final"]
        print(f"{r['run']:>12}: {r['mean_epoch_s_after_first']:7.2f} s/epoch  mAP50 {m.get('metrics/mAP50(B)', 0):.4f}  "
              f"mAP50-95 {m.get('metrics/mAP50-95(B)', 0):.4f}  at_loss {m.get('train/at_loss', float('nan')):.4f}")
    print(f"device: {report['device']}; report: {args.out}")


if __name__ == "__main__":
    main()
