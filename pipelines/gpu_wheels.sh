#!/usr/bin/env bash
# Download, here, the wheels pipelines/gpu.sh needs on a GPU machine that has torch, torchvision and OpenCV but no
# package index: ultralytics, zarr, numcodecs, dask and what they need beyond that image, into .whl/ (git-ignored).
#   bash pipelines/gpu_wheels.sh            # then carry .whl to the machine and run pipelines/gpu.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
mkdir -p .whl
pkgs=()
for name in ultralytics ultralytics-thop ultralytics-platform zarr numcodecs donfig google-crc32c dask partd locket; do
  pkgs+=("$name==$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
du -sh .whl
