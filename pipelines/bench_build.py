"""Build-cache throughput vs the floor (pure teacher inference on the same decoded batches), on one device.

    python pipelines/bench_build.py --teacher yolo11m.yaml --imgsz 640 --images 48 --batch 8 --device cpu \
        --out-json pipelines/results/build_cpu.json

Generates a synthetic VOC-format dataset (VOC-like ~500px images), then times, in one run on one device:
  inference: DataLoader (same workers) + teacher forward of every batch, full network, no hooks, nothing stored;
  build:     `build_cache` end to end (hooks, early stop after the deepest layer, maps, fp16, zarr writes).
Both include image decoding and letterboxing; model loading and store creation are excluded from the build time
only as far as build_cache's own clock does (it includes them, so the ratio is conservative)."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from atcache.env import prepare_ultralytics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="yolo11m.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--images", type=int, default=48, help="synthetic images generated (train split is ~78%)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="atcache-bench-build-") as tmp:
        tmp = Path(tmp)
        prepare_ultralytics(tmp / "ultralytics")
        from atcache.build import BuildConfig, build_cache, resolve_device
        from atcache.data import LetterboxedImages, split_files
        from atcache.synthetic import make_demo_data
        from atcache.teacher import load_teacher
        from atcache.voc import prepare_voc

        data = prepare_voc(make_demo_data(tmp, images=args.images, size=500, progress=False), tmp / "VOC", progress=False)
        split = split_files(data, "train")
        device = resolve_device(args.device)
        cuda = device.type == "cuda"
        teacher = load_teacher(args.teacher, nc=20, device=device)
        loader = torch.utils.data.DataLoader(
            LetterboxedImages(split, range(len(split.files)), args.imgsz), batch_size=args.batch,
            num_workers=args.workers, pin_memory=cuda)
        with torch.no_grad():  # warm-up
            teacher.model(torch.zeros(args.batch, 3, args.imgsz, args.imgsz, device=device))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _, images, _, _ in loader:
                x = images.to(device, non_blocking=True).float().div_(255)
                with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                    teacher.model(x)
        if cuda:
            torch.cuda.synchronize()
        inference_s = time.perf_counter() - t0

        report = build_cache(BuildConfig(
            teacher=args.teacher, data=str(data), out=str(tmp / "c.zarr"), imgsz=args.imgsz, batch=args.batch,
            device=args.device, workers=args.workers, progress=False))
        n = len(split.files)
        import ultralytics
        import zarr

        result = {
            "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "teacher": args.teacher, "imgsz": args.imgsz, "batch": args.batch, "workers": args.workers, "images": n,
            "inference_img_per_s": n / inference_s,
            "build_img_per_s": report.img_per_s,
            "build_over_inference": report.img_per_s / (n / inference_s),
            "build_seconds_incl_model_load": report.seconds,
            "store_bytes_per_image": report.bytes_per_image,
            "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "zarr": zarr.__version__},
        }
    print(json.dumps(result, indent=2))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
