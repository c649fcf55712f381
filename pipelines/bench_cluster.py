"""Wall time of one build-cache run in one process vs on a dask LocalCluster (`--scheduler local:N`), same settings,
same machine, one after the other; checks that both stores hold the same arrays. Writes a JSON report.

    python pipelines/bench_cluster.py --teacher runs/demo/teacher/weights/best.pt --data runs/demo/data/VOC/VOC.yaml \
        --imgsz 320 --device cpu --workers 2 --out pipelines/results/cluster_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def build(args, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "atcache", "build-cache", "--teacher", args.teacher, "--data", args.data, "--out",
           str(out), "--imgsz", str(args.imgsz), "--batch", str(args.batch), "--device", args.device, "--workers",
           str(args.workers), "--chunk-rows", str(args.chunk_rows), "--no-progress", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def same_arrays(a: Path, b: Path) -> bool:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = [f"{kind}/{layer['index']}" for layer in ga.attrs["atcache"]["layers"] for kind in ("maps", "norms")]
    return all(np.array_equal(ga[n][:], gb[n][:], equal_nan=True) for n in names + ["letterbox", "done"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=16)
    p.add_argument("--scheduler", default="local:2")
    p.add_argument("--out", default="pipelines/results/cluster_cpu.json")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atcache-bench-cluster-"))
    try:
        one = build(args, tmp / "one.zarr", [])
        cluster = build(args, tmp / "cluster.zarr", ["--scheduler", args.scheduler])
        rows = zarr.open_group(str(tmp / "one.zarr"), mode="r").attrs["atcache"]["n_rows"]
        report = {
            "device": args.device, "cpu_count": os.cpu_count(), "rows": rows, "imgsz": args.imgsz,
            "teacher": args.teacher, "scheduler": args.scheduler, "chunk_rows": args.chunk_rows,
            "one_process_s": round(one, 2), "cluster_s": round(cluster, 2),
            "one_process_img_per_s": round(rows / one, 2), "cluster_img_per_s": round(rows / cluster, 2),
            "same_arrays": same_arrays(tmp / "one.zarr", tmp / "cluster.zarr"),
            "note": "wall time of the whole command (start-up, teacher load, cluster start, build)",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
