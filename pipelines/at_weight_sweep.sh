#!/usr/bin/env bash
# --at-weight sweep of train-from-cache on one dataset and cache, same budget as a plain run: compare the
# train/at_loss and detection-loss columns and the mAP of each run's results.csv.
#
#   DATA=runs/demo/data/VOC/VOC.yaml CACHE=runs/demo/teacher_cache.zarr IMGSZ=128 EPOCHS=10 bash pipelines/at_weight_sweep.sh
set -euo pipefail
: "${DATA:?set DATA to the data YAML}" "${CACHE:?set CACHE to its cache}"
WEIGHTS=${WEIGHTS:-0.3 1 3 10}
COMMON=(--student "${STUDENT:-yolo11n.yaml}" --data "$DATA" --epochs "${EPOCHS:-10}" --imgsz "${IMGSZ:-640}"
        --batch "${BATCH:-16}" --device "${DEVICE:-cpu}" --project "${PROJECT:-runs/at_weight_sweep}" seed=0 exist_ok=True)
atcache train --name plain "${COMMON[@]}"
for w in $WEIGHTS; do
  atcache train-from-cache --cache "$CACHE" --at-weight "$w" --name "cache_w$w" "${COMMON[@]}"
done
