#!/usr/bin/env bash
# bench/gpu.sh — the GPU checks, as one prepared script (a GPU machine is lent to some sessions by
# chance; nothing in the build or the tests depends on one).
#
#   bash bench/gpu.sh CONFIG_DIR COCO_DIR [OUT_DIR]
#
# CONFIG_DIR: the published BLIP-2 OPT-2.7B folder without weights (hf-configs/Salesforce_blip2-opt-2.7b);
# COCO_DIR: a folder in the COCO captions layout (a few images are enough: --fast-dev-run reads 4 per
# section). On a machine without this project's dependencies, WHEELS=DIR installs the wheels in DIR
# into /tmp/site first (pip --no-index --no-deps).
#
# 1. the machine: GPU, driver, torch/transformers versions, a bf16 matrix product's TFLOP/s;
# 2. the real-size llm28_q8 chain in bf16 on CUDA, both heals (bench/real_size_chain.py --device
#    cuda): each stage's time, peak RSS and peak GPU memory against the 7.49 GB checkpoint, and the
#    tensor-name check. The evaluate stages score perplexity only and the gate keeps its parameter
#    rule, so no Java (METEOR, PTB tokenizer) is needed there.
set -uo pipefail
CONFIG=${1:?CONFIG_DIR}; COCO=${2:?COCO_DIR}; OUTDIR=${3:-bench/out/gpu}
mkdir -p "$OUTDIR"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
# transformers 5.25 kernelizes models with Hub kernels by default whenever a `kernels` package is
# installed, and refuses one outside 0.19.x; these machines are offline, so Hub kernels stay off.
export USE_HUB_KERNELS=0
python3 -c "import compressor.cli, transformers, peft, datasets, pydantic, accelerate" || {
  python3 -m pip check 2>&1 | head -20; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUTDIR/machine.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUTDIR/machine.txt"
import time, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"bf16 8192^3 matmul: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
python3 bench/real_size_chain.py --config "$CONFIG" --coco "$COCO" --device cuda --out /tmp/real_size_chain \
  --set "stages.2.metrics=[perplexity]" --set "stages.7.metrics=[perplexity]" \
  --set "gate.rules={params_total: {max_ratio: 0.91}}" 2>&1 | tee "$OUTDIR/real_size_chain.log" | grep -v "^W\|Warning"
