#!/usr/bin/env bash
# The reference experiment on real Pascal VOC 07+12: YOLO11m teacher -> YOLO11s student, AT on layers 6,8,13,16,19,22,
# imgsz 640, p=2, the reference AT loss. Stage 1 caches the teacher once (every visible GPU); stage 2 trains the student from
# the cache, then the two baselines with the same budget: the student alone and online AT (teacher every step).
#
#   VOCDEVKIT=~/data/VOCdevkit TEACHER=runs/detect/voc_yolo11m/weights/best.pt bash pipelines/voc_seed_experiment.sh
#
# No TEACHER yet? Leave it unset and the script first fine-tunes ultralytics' yolo11m.pt on VOC (needs the internet once
# for the COCO weights). The cache build resumes when the script is rerun; an interrupted training resumes with
# ultralytics' own resume: atcache train-from-cache ... resume=$PROJECT/from_cache/weights/last.pt
# IMGSZ/EPOCHS/BATCH/STUDENT/DEVICE and BENCH_ARGS (extra `atcache bench` options) can be overridden for a dry run.
set -euo pipefail
: "${VOCDEVKIT:?set VOCDEVKIT to your VOCdevkit folder (with VOC2007/ and VOC2012/)}"
DATASET=${DATASET:-datasets/VOC}
CACHE=${CACHE:-caches/voc_yolo11m_640.zarr}
STUDENT=${STUDENT:-yolo11s.yaml}   # from scratch as in the seed; yolo11s.pt starts from COCO weights
EPOCHS=${EPOCHS:-100}
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-0}                # 0,1,2,3 trains with DDP on four GPUs
PROJECT=${PROJECT:-runs/voc_seed}
IMGSZ=${IMGSZ:-640}
LAYERS=6,8,13,16,19,22
export DATASET CACHE LAYERS IMGSZ BATCH

atcache prepare-voc --devkit "$VOCDEVKIT" --out "$DATASET"
if [ -z "${TEACHER:-}" ]; then
  TEACHER="$PROJECT/teacher/weights/best.pt"
  if [ ! -f "$TEACHER" ]; then
    atcache train --student yolo11m.pt --data "$DATASET/VOC.yaml" --epochs "$EPOCHS" --imgsz "$IMGSZ" --batch "$BATCH" \
      --device "$DEVICE" --project "$PROJECT" --name teacher exist_ok=True
  fi
fi
export TEACHER
bash "$(dirname "$0")/voc_build_cache.sh"

COMMON=(--student "$STUDENT" --data "$DATASET/VOC.yaml" --epochs "$EPOCHS" --imgsz "$IMGSZ" --batch "$BATCH"
        --device "$DEVICE" --project "$PROJECT" seed=0 exist_ok=True)
atcache train-from-cache --cache "$CACHE" --layers "$LAYERS" --name from_cache "${COMMON[@]}"
atcache train --name plain "${COMMON[@]}"
atcache train-online --teacher "$TEACHER" --layers "$LAYERS" --name online "${COMMON[@]}"

# Speed and memory of the three trainers and of the build, side by side on one GPU.
atcache bench --data "$DATASET/VOC.yaml" --teacher "$TEACHER" --student "$STUDENT" --imgsz "$IMGSZ" --batch "$BATCH" \
  --device "${DEVICE%%,*}" --out "$PROJECT/bench" --json "$PROJECT/bench.json" ${BENCH_ARGS:-}
echo "results: $PROJECT/{from_cache,plain,online}/results.csv and $PROJECT/bench.json"
