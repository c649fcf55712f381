#!/usr/bin/env bash
# The one-call GPU check: `atcache bench --gradient` at the reference setup (YOLO11m -> YOLO11s, imgsz 640, batch 64,
# the six seed layers, generated images; trainers in 3 interleaved rounds with the gradient-AT and flip trainers, the
# replay build's views/s with and without --gradient, the device renderer's warp targets/s, storage precision), then
# the fidelity of warp and replay targets (and of the replayed input gradients) to the live teacher. JSON into
# $RESULTS (pipelines/results by default): bench_$TAG.json, fidelity_{warp,replay,gradient}_$TAG.json.
#
# On a bare GPU machine with torch, torchvision and OpenCV but without ultralytics, zarr, numcodecs or dask: run
# `bash pipelines/gpu_wheels.sh` here first and carry .whl/ there; the script installs them into /tmp and runs atcache
# from this checkout (about 6-7 minutes on one H200).
#   bash pipelines/gpu.sh                                   # DEVICE=0, TAG=gpu
#   DEVICE=cpu QUICK=1 TAG=cpu_quick bash pipelines/gpu.sh  # its CPU path at toy sizes (tests/test_pipelines.py)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-0}
TAG=${TAG:-gpu}
RUN=${RUN:-runs/gpu_check}
RESULTS=${RESULTS:-pipelines/results}
export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
if ! python3 -c "import ultralytics, zarr, numcodecs, dask" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu.sh: ultralytics, zarr, numcodecs or dask is missing and there is no .whl/; run pipelines/gpu_wheels.sh where pip works and carry .whl here" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/atcache-site .whl/*.whl
  export PYTHONPATH=/tmp/atcache-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # atcache from this checkout
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$RUN/ultralytics}
ROUNDS=3
if [ -n "${QUICK:-}" ]; then
  ROUNDS=2  # enough to exercise the interleaving
  BENCH=(--teacher yolo11n.yaml --student yolo11n.yaml --imgsz 64 --batch 4 --steps 3 --warmup 1 --repeats 1 --workers 0)
  FIDELITY=(--batches 2 --batch 4)
else
  BENCH=(--teacher yolo11m.yaml --student yolo11s.yaml --imgsz 640 --batch 64 --steps 16 --warmup 3 --repeats 2 --workers 12)
  FIDELITY=(--batches 4 --batch 32)
fi
mkdir -p "$RUN" "$RESULTS"
B=$RUN/bench
python3 -m atcache bench "${BENCH[@]}" --gradient --rounds "$ROUNDS" --device "$DEVICE" --out "$B" --json "$RESULTS/bench_$TAG.json"
for targets in warp replay; do
  cache=$B/bench_cache.zarr
  [ "$targets" = replay ] && cache=$B/bench_replay.zarr
  python3 -m atcache fidelity --cache "$cache" --teacher "$B/bench_teacher.pt" --data "$B/data/bench.yaml" \
    --targets "$targets" --device "$DEVICE" "${FIDELITY[@]}" --json "$RESULTS/fidelity_${targets}_$TAG.json"
done
python3 -m atcache fidelity --cache "$B/bench_replay_grad.zarr" --teacher "$B/bench_teacher.pt" --data "$B/data/bench.yaml" \
  --targets replay --gradient --device "$DEVICE" "${FIDELITY[@]}" --json "$RESULTS/fidelity_gradient_$TAG.json"
echo "gpu.sh: results in $RESULTS (bench_$TAG.json, fidelity_{warp,replay,gradient}_$TAG.json)"
