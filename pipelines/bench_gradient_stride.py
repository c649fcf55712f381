"""What the pooling stride of cached teacher gradients (`build-cache --gradient --gradient-stride S`) costs and saves.

For each stride s, on real letterboxed training images with their labels (ultralytics' YOLODataset, augment=False,
rect=False, its collate_fn):
1. storage: the teacher's J_T = dL/dx (eval mode, unfused, as build-cache takes it) pooled by s, split into a float16
   unit direction + float32 norm, written to an in-memory zarr v3 array with the store's codecs
   (map_compressors("float16"): blosc lz4 + bitshuffle, crc32c) chunked as the store does (chunk_rows rows): raw and
   compressed bytes per image, and the arithmetic raw bytes per image at imgsz 640 (compressed at 640 estimated with
   the ratio measured here);
2. training: the cosine between the student's weight gradient of gradient_at_loss(pool_s(J_S), pool_s(J_T)) and
   that of the full-resolution loss (s=1), on the same batch (student in train mode, J_S with create_graph=True);
   the same with J_T decoded from its float16 direction (what training reads from the store); and the per-image
   cosine of pool_s(J_T) nearest-upsampled to J_T (how much of the teacher's gradient survives pooling).

    python pipelines/bench_gradient_stride.py --teacher runs/demo/teacher/weights/best.pt \
        --data runs/demo/data/VOC/VOC.yaml --imgsz 128 --images 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_batch(data: str, imgsz: int, n: int) -> dict:
    """The first n training images of `data`, letterboxed to imgsz without augmentation, with their labels."""
    from atcache.yolo import YOLODataset, check_det_dataset, get_cfg

    info = check_det_dataset(data)
    hyp = get_cfg()
    ds = YOLODataset(img_path=info["train"], imgsz=imgsz, cache=False, augment=False, hyp=hyp, rect=False,
                     batch_size=n, stride=32, pad=0.0, data=info, task="detect")
    return YOLODataset.collate_fn([ds[i] for i in range(min(n, len(ds)))])


def stored_bytes(direction: np.ndarray, norm: np.ndarray, chunk_rows: int) -> dict:
    """Bytes of the chunk objects of grad/direction and grad/norm written as the store writes them (metadata excluded)."""
    import zarr
    from zarr.storage import MemoryStore

    from atcache.cache.format import map_compressors, small_compressors

    out = {}
    for name, arr, chunks, comp in (
            ("direction", direction, (chunk_rows, *direction.shape[1:]), map_compressors("float16")),
            ("norm", norm, (chunk_rows,), small_compressors(4))):
        d: dict = {}
        z = zarr.create_array(store=MemoryStore(d), shape=arr.shape, chunks=chunks, dtype=arr.dtype,
                              compressors=comp, fill_value=np.nan, zarr_format=3)
        z[:] = arr
        out[name] = sum(len(v.to_bytes()) for k, v in d.items() if not k.endswith("zarr.json"))
    return out


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def upsample(J: torch.Tensor, s: int) -> torch.Tensor:
    return J if s == 1 else J.repeat_interleave(s, -2).repeat_interleave(s, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", default="yolo11n.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--strides", default="1,2,4,8,16")
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", default="pipelines/results/gradient_stride_cpu.json")
    args = ap.parse_args()

    from atcache.yolo import prepare

    prepare()
    from atcache.attention.gradient import gradient_at_loss, input_gradient, join, pool_gradient, split
    from atcache.yolo import check_det_dataset, load_model

    strides = [int(s) for s in args.strides.split(",")]
    if 1 not in strides:
        strides = [1, *strides]
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    batch = load_batch(args.data, args.imgsz, args.images)
    x = batch["img"].float() / 255.0
    labels = {k: batch[k] for k in ("batch_idx", "cls", "bboxes")}
    n = x.shape[0]
    nc = len(check_det_dataset(args.data)["names"])

    teacher = load_model(args.teacher, nc=nc, device="cpu", fuse=False).model.eval()
    J_T = input_gradient(teacher, x, labels)
    t_teacher = time.perf_counter() - t0

    student = load_model(args.student, nc=nc, device="cpu", fuse=False).model
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    J_S = input_gradient(student, x, labels, create_graph=True)

    rows, g_full = [], None
    for s in strides:
        if args.imgsz % s:
            print(f"stride {s} does not divide imgsz {args.imgsz}: skipped")
            continue
        P_T = pool_gradient(J_T, s)
        direction, norm = split(P_T)
        d16 = direction.half()
        P_T16 = join(d16, norm)
        raw = d16.numel() * 2 + norm.numel() * 4
        sb = stored_bytes(d16.numpy(), norm.numpy(), min(args.chunk_rows, n))
        comp = sb["direction"] + sb["norm"]
        g = flat_grad(gradient_at_loss(pool_gradient(J_S, s), P_T), params)
        g16 = flat_grad(gradient_at_loss(pool_gradient(J_S, s), P_T16), params)
        if s == 1:
            g_full = g
        up = upsample(P_T, s)
        per_image = [cosine(up[i], J_T[i]) for i in range(n)]
        G640 = 640 // s
        raw640 = 3 * G640 * G640 * 2 + 4
        rows.append({
            "stride": s, "grid": args.imgsz // s,
            "raw_bytes_per_image": raw / n, "compressed_bytes_per_image": comp / n,
            "direction_compressed_bytes_per_image": sb["direction"] / n, "compression_ratio": raw / comp,
            "raw_bytes_per_image_at_640": raw640,
            "compressed_bytes_per_image_at_640_est": raw640 * comp / raw,
            "weight_grad_cosine_vs_s1": cosine(g, g_full),
            "weight_grad_cosine_vs_s1_fp16_store": cosine(g16, g_full),
            "teacher_J_cosine_upsampled_mean": float(np.mean(per_image)),
            "teacher_J_cosine_upsampled_min": float(np.min(per_image)),
        })
        print(f"s={s}: {rows[-1]}", flush=True)

    report = {
        "what": "gradient stride: store bytes of pooled teacher input gradients and the student weight-gradient "
                "cosine of the pooled gradient-AT loss to the full-resolution one",
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                   "torch_threads": torch.get_num_threads()},
        "settings": {"teacher": args.teacher, "student": args.student, "student_init": "YAML, seeded random init, train mode",
                     "data": args.data, "imgsz": args.imgsz, "images": n, "boxes": int(len(labels["cls"])),
                     "chunk_rows": min(args.chunk_rows, n), "codec": "map_compressors('float16'): blosc lz4 clevel 5 "
                     "bitshuffle + crc32c (direction); small_compressors(4) (norm)", "seed": args.seed,
                     "teacher_J_norm_mean": float(torch.linalg.vector_norm(J_T.flatten(1), dim=1).mean()),
                     "student_J_norm_mean": float(torch.linalg.vector_norm(J_S.detach().flatten(1), dim=1).mean())},
        "seconds": time.perf_counter() - t0, "teacher_seconds": t_teacher,
        "strides": rows,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndevice: {report['device']['cpu']}, {report['device']['cores']} cores, torch {torch.__version__}; "
          f"imgsz {args.imgsz}, {n} images\n")
    print("| stride | grid | raw B/img | stored B/img | raw B/img @640 | stored B/img @640 (est.) "
          "| cos(weight grad, s=1) | same, fp16 store | cos(up(pool J_T), J_T) mean / min |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stride']} | {r['grid']} | {r['raw_bytes_per_image']:,.0f} | {r['compressed_bytes_per_image']:,.0f} "
              f"| {r['raw_bytes_per_image_at_640']:,} | {r['compressed_bytes_per_image_at_640_est']:,.0f} "
              f"| {r['weight_grad_cosine_vs_s1']:.4f} | {r['weight_grad_cosine_vs_s1_fp16_store']:.4f} "
              f"| {r['teacher_J_cosine_upsampled_mean']:.3f} / {r['teacher_J_cosine_upsampled_min']:.3f} |")
    print(f"\nwrote {args.out_json} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
