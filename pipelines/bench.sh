#!/usr/bin/env bash
# `atcache bench` in the two configurations the README reports, raw JSON into pipelines/results/.
#
#   bash pipelines/bench.sh gpu   # the goal setup: YOLO11m -> YOLO11s, imgsz 640, batch 64, on GPU 0 (DATA=VOC.yaml to
#                                 # use real VOC; TEACHER=best.pt for a trained teacher; default: synthetic, random init)
#   bash pipelines/bench.sh cpu   # the same pair at imgsz 320, batch 8, on a CPU (~15 min on 2 cores)
#   bash pipelines/bench.sh cpu-small   # YOLO11n -> YOLO11n at imgsz 128, batch 8, 5 rounds, on a CPU (~5 min on 2 cores)
#   bash pipelines/bench.sh cpu-gradient   # cpu-small with --gradient: + grad, grad_online, flip (~12 min on 2 cores)
# Trainers run in 3 interleaved rounds; the images default to enough for warm-up + measured steps inside one epoch.
set -euo pipefail
MODE=${1:?usage: bench.sh gpu|cpu|cpu-small|cpu-gradient}
TEACHER=${TEACHER:-yolo11m.yaml}
DATA_ARGS=()
if [ -n "${DATA:-}" ]; then DATA_ARGS=(--data "$DATA"); fi
case "$MODE" in
  gpu) atcache bench "${DATA_ARGS[@]}" --teacher "$TEACHER" --student yolo11s.yaml --imgsz 640 --batch 64 --steps 30 \
         --warmup 10 --workers 8 --device "${DEVICE:-0}" --out runs/bench_gpu --json pipelines/results/bench_gpu.json ;;
  cpu) atcache bench "${DATA_ARGS[@]}" --teacher "$TEACHER" --student yolo11s.yaml --imgsz 320 --batch 8 --steps 20 \
         --warmup 2 --device cpu --out runs/bench_cpu --json pipelines/results/bench_cpu.json ;;
  cpu-small) atcache bench "${DATA_ARGS[@]}" --teacher yolo11n.yaml --student yolo11n.yaml --imgsz 128 --batch 8 --rounds 5 \
         --steps 20 --warmup 3 --device cpu --out runs/bench_cpu_n128 --json pipelines/results/bench_cpu_yolo11n_128.json ;;
  cpu-gradient) atcache bench "${DATA_ARGS[@]}" --teacher yolo11n.yaml --student yolo11n.yaml --imgsz 128 --batch 8 \
         --rounds 5 --steps 20 --warmup 3 --device cpu --gradient --out runs/bench_cpu_gradient \
         --json pipelines/results/bench_cpu_gradient.json ;;
  *) echo "usage: bench.sh gpu|cpu|cpu-small|cpu-gradient" >&2; exit 2 ;;
esac
