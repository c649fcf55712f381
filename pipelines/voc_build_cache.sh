#!/usr/bin/env bash
# Stage 1 of the seed experiment on real Pascal VOC 07+12: convert the devkit, then run the YOLO11m teacher once
# over the 16,551 training images on every visible GPU (one shard per GPU, all writing the same store).
#
#   VOCDEVKIT=~/data/VOCdevkit TEACHER=runs/detect/voc_yolo11m/weights/best.pt bash pipelines/voc_build_cache.sh
#
# Interrupted? Run it again: finished chunks are kept and only the rest is computed (--resume).
set -euo pipefail
: "${VOCDEVKIT:?set VOCDEVKIT to your VOCdevkit folder (with VOC2007/ and VOC2012/)}"
: "${TEACHER:?set TEACHER to your trained YOLO11m checkpoint (.pt)}"
DATASET=${DATASET:-datasets/VOC}
CACHE=${CACHE:-caches/voc_yolo11m_640.zarr}
IMGSZ=${IMGSZ:-640}
BATCH=${BATCH:-64}
LAYERS=${LAYERS:-6,8,13,16,19,22}
NGPU=${NGPU:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}

atcache prepare-voc --devkit "$VOCDEVKIT" --out "$DATASET"
mkdir -p "$(dirname "$CACHE")"
# one shard process per device: 0,1,...,NGPU-1 (or cpu,cpu,... without CUDA)
DEVICES=$(python3 -c "import torch; n=$NGPU; print(','.join(str(i) if torch.cuda.is_available() else 'cpu' for i in range(n)))")
atcache build-cache --teacher "$TEACHER" --data "$DATASET/VOC.yaml" --split train --out "$CACHE" \
  --imgsz "$IMGSZ" --batch "$BATCH" --layers "$LAYERS" --device "$DEVICES" --resume
