"""How many bytes per image a uint8 cache needs at a given precision: a trained teacher's maps at one imgsz,
quantised per map (x / max)^pow to `levels` steps, each variant compressed as a whole row-chunk per layer; the
worst cosine to the float32 maps and KB per image (all layers) for each codec. What chose `build-cache --dtype uint8`.

    python pipelines/bench_uint8_codecs.py --teacher runs/accuracy/teacher/weights/best.pt \
        --data runs/accuracy/data/VOC/VOC.yaml --imgsz 640 --json pipelines/results/uint8_codecs_cpu.json
"""

from __future__ import annotations

import argparse
import json

import numcodecs
import numpy as np
import torch

from atcache.yolo import prepare

CODECS = {
    "zstd9": lambda: numcodecs.Blosc("zstd", 9, numcodecs.Blosc.NOSHUFFLE),
    "zstd9+bitshuffle": lambda: numcodecs.Blosc("zstd", 9, numcodecs.Blosc.BITSHUFFLE),
    "lz4+bitshuffle": lambda: numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
    "zstd22": lambda: numcodecs.Zstd(22),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--layers", default="6,8,13,16,19,22")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    prepare()
    from atcache.data.splits import LetterboxedImages, split_files
    from atcache.attention.recipe import layer_maps
    from atcache.tools.measure import device_name
    from atcache.yolo import load_model

    layers = tuple(int(x) for x in args.layers.split(","))
    teacher = load_model(args.teacher, device="cpu").model.float()
    split = split_files(args.data, "train")
    n = min(args.images, len(split.files))
    loader = torch.utils.data.DataLoader(LetterboxedImages(split, range(n), args.imgsz), batch_size=8)
    maps = {i: [] for i in layers}
    for _, images, _, _ in loader:
        out, _ = layer_maps(teacher, images, layers, 2.0, "sum_p", 1e-8, amp=False)  # float32
        for i, m in zip(layers, out):
            maps[i].append(m.cpu().numpy())
    maps = {i: np.concatenate(v) for i, v in maps.items()}
    variants = []
    for power, levels in ((0.5, 255), (0.75, 255), (1.0, 255), (0.5, 127)):
        worst, stored = 1.0, {}
        for i, x in maps.items():
            scale = x.reshape(n, -1).max(1)[:, None, None]
            q = np.round(levels * np.clip(x / scale, 0, 1) ** power).astype(np.uint8)
            decoded = (scale * (q / levels) ** (1 / power)).reshape(n, -1)
            exact = x.reshape(n, -1)
            cos = (decoded * exact).sum(1) / (np.linalg.norm(decoded, axis=1) * np.linalg.norm(exact, axis=1))
            worst, stored[i] = min(worst, float(cos.min())), q
        kb = {name: sum(len(make().encode(np.ascontiguousarray(q))) for q in stored.values()) / n / 1e3
              for name, make in CODECS.items()}
        kb["row-delta+zstd9"] = sum(len(CODECS["zstd9"]().encode(np.diff(q.astype(np.int16), axis=2, prepend=0)
                                                                 .astype(np.int8))) for q in stored.values()) / n / 1e3
        variants.append({"power": power, "levels": levels, "min_cosine": worst, "kb_per_image": kb})
        print(f"(x/max)^{power} x {levels}: min cosine {worst:.6f}  " + "  ".join(f"{k} {v:.2f} KB" for k, v in kb.items()))
    raw16 = sum(m[0].size * 2 for m in maps.values())
    report = {"teacher": args.teacher, "imgsz": args.imgsz, "images": n, "layers": list(layers),
              "raw_float16_kb_per_image": raw16 / 1e3, "device": device_name("cpu"), "variants": variants}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
