#!/usr/bin/env bash
# Everything that needs a CUDA device, in one go (a lent GPU machine is held for minutes, not hours):
# the gpu-marked tests, then the Ray engine with one GPU worker against the local engine on the same
# GPU (same metrics; throughput of both), and CERTIFY on the GPU against ART's. Figures go to stdout and to $OUT (when set) for the notes.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu-check}"
mkdir -p "$out"
status=0

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || exit 1
fi
.venv/bin/pip install -q -e '.[dev,ray]' || { echo "could not install .[dev,ray]"; exit 1; }
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$out/device.txt" || exit 1

.venv/bin/python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

.venv/bin/python scripts/ray_gpu_check.py 2>&1 | tee "$out/ray-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# randomized smoothing's CERTIFY on the device against ART's PyTorchRandomizedSmoothing (device_type gpu)
.venv/bin/pip install -q statsmodels || { echo "could not install statsmodels for ART's bound"; exit 1; }
.venv/bin/python benchmarks/certify_speed.py --device cuda --repeats 3 2>&1 | tee "$out/certify-speed-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit "$status"
