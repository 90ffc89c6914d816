#!/usr/bin/env bash
# The GPU checks in one run (about 6 minutes on one H100/H200): the GPU tests (tests/test_gpu.py:
# a study of all six architectures on the GPU, in float32/TF32 and in bfloat16, against the CPU,
# its files loaded on a CPU, a study killed mid-arm resumed on the GPU, training steps that never
# wait for the GPU), then the training step at 768x24576 and 2304x65536, batch 4096, with TF32
# matmuls and with --dtype bfloat16, each against the matmul peak of its precision measured in the
# same run, then ours against SAELens and sparsify (its Triton kernels) on the same GPU. Needs a
# Python whose torch is a CUDA build and has requirements.txt installed (`make clean-venv && make
# test TORCH_INDEX=https://download.pytorch.org/whl/cu128`, or PY=python3 where they are already
# there), and for the last part the peers' venv built the same way (`make bench-peers
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 ARGS=--help`; PEERS_PY names another Python).
# Writes its logs to $OUT (default: gpu-check/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-.venv-peers/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), f'torch {torch.__version__} sees no GPU'; \
          print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
"$PY" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" || echo "GPU tests failed (above); the benchmark runs all the same"
"$PY" benchmarks/bench_train.py --device cuda --shapes gpu --steps 10 2>&1 | tee "$OUT/bench_train.txt"
"$PY" benchmarks/bench_train.py --device cuda --shapes gpu --steps 10 --dtype bfloat16 2>&1 | tee "$OUT/bench_train_bf16.txt"
if [ -x "$PEERS_PY" ]; then
  "$PEERS_PY" benchmarks/bench_peers.py --device cuda --steps 10 2>&1 | tee "$OUT/bench_peers.txt"
else
  echo "no $PEERS_PY: the comparison with SAELens and sparsify is left out" | tee "$OUT/bench_peers.txt"
fi
