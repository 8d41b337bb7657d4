#!/usr/bin/env bash
# The GPU checks of one short lease, most important first, each under its own time limit:
#   1. the kernel and engine tests against the compiled Triton kernels (pytest -m gpu);
#   2. bench_sampling.py on the default model (64-dim latent), bench_kernels.py (the kernels
#      against their references, the device's ceilings, a profile of the engine's loop), then
#      bench_sampling.py on gene-space diffusion;
#   3. bench_training.py's CUDA rows.
# Models come from files (``bench_sampling.py --save-model``), so the node needs no data:
#   python bench/bench_sampling.py --save-model .devdata/default_latent64.pt --methods eager --batch-sizes 256
#   python bench/bench_sampling.py --latent-dim 0 --save-model .devdata/default_genes.pt --methods eager --batch-sizes 256
# Python packages missing on the node (anndata and its needs) can come as wheels in .whl/.
# Results (JSON) and one log go to $OUT (default bench/results/gpu; the committed runs sit in its
# h100/ and h200/ folders, one per device).
set -u
OUT=${OUT:-bench/results/gpu}
MODELS=${MODELS:-.devdata}
BATCHES=${BATCHES:-256,1024,4096,16384,65536,262144}
mkdir -p "$OUT" /tmp/scidiff_gpu
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_checks.log"
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, anndata; print('torch', torch.__version__, 'triton', triton.__version__, 'anndata', anndata.__version__, torch.cuda.get_device_name())"

stage "tests on the GPU (pytest -m gpu)"
timeout "${TEST_SECONDS:-180}" python3 -m pytest -p no:cacheprovider -p no:benchmark -m gpu -q -rs -n "${TEST_WORKERS:-8}" \
    tests/test_kernels.py tests/test_engine.py
echo "pytest exit: $?"

sampling() {  # name, model file, time limit
    stage "bench_sampling: $1"
    timeout "$3" python3 bench/bench_sampling.py --model "$MODELS/$2" --batch-sizes "$BATCHES" --threads 8 \
        --methods eager,engine,engine_fp32,engine_torch_ops,engine_to_cpu --repeats "${REPEATS:-3}" --out "/tmp/scidiff_gpu/sampling_$1.json"
    local rc=$?
    echo "bench_sampling $1 exit: $rc"
    [ -f "/tmp/scidiff_gpu/sampling_$1.json" ] && cp "/tmp/scidiff_gpu/sampling_$1.json" "$OUT/"
    return $rc
}
sampling latent64 default_latent64.pt "${SAMPLING_SECONDS:-120}" \
    || SCIDIFF_KERNELS=torch sampling latent64_torch_kernels default_latent64.pt 90
stage "bench_kernels"
timeout "${KERNELS_SECONDS:-90}" python3 bench/bench_kernels.py --model "$MODELS/default_latent64.pt" \
    --out "$OUT/kernels.json"
echo "bench_kernels exit: $?"
sampling genes default_genes.pt "${SAMPLING_SECONDS:-100}"

[ "${TRAINING_SECONDS:-120}" -gt 0 ] || { stage "done"; exit 0; }
stage "bench_training: CUDA rows"
timeout "${TRAINING_SECONDS:-120}" python3 bench/bench_training.py --devices cuda --models latent,genes \
    --variants "eager fp32,eager bf16 autocast,compiled bf16 autocast" --batch 4096 --cells 65536 --steps 10 \
    --out /tmp/scidiff_gpu/training_gpu.json
echo "bench_training exit: $?"
[ -f /tmp/scidiff_gpu/training_gpu.json ] && cp /tmp/scidiff_gpu/training_gpu.json "$OUT/"
stage "done"
