#!/usr/bin/env bash
# The GPU checks (issues 7 and 8), run on a GPU machine from the repository root:
#     scripts/gpu_checks.sh [OUTDIR]        (default: $OUT if set, else ./gpu-results)
# 1. a smoke run (TP=1 healthy demo on CUDA); stops here if that fails;
# 2. the gpu-marked tests (tests/test_gpu.py): TP=1 with one GPU, TP=2 too with two
#    (GPU_CHECKS_PYTEST=0 skips them);
# 3. the figures for docs/gpu-results.md: python -m watchdog.demo.cuda.checks for each TP size in
#    GPU_CHECKS_TPS (default "1 2 4") that the visible GPUs allow (verdicts, culprits, keys,
#    latencies, NCCL RAS and flight recorder during the same hangs, ledger on/off steps/s, ns per
#    record); CHECKS_ARGS are passed on (e.g. "--overhead-blocks 4").
# Every step runs under `timeout` (which signals its whole process group), and the script ends by
# killing any process of its own still holding a GPU. It never touches clocks, power, modes or resets.
# Wheels for packages the machine lacks (py-spy) are taken from .whl/ if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi

cleanup() {
    # Only our own processes hold GPUs on this machine: whatever still does is a leftover of ours.
    for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
        kill -9 "$pid" 2>/dev/null && echo "gpu_checks: killed leftover pid $pid"
    done
}
trap cleanup EXIT

{
    nvidia-smi --query-gpu=index,name,driver_version,utilization.gpu,power.draw,clocks.sm,memory.used --format=csv
    python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "triton", triton.__version__, "gpus", torch.cuda.device_count())'
    py-spy --version
} 2>&1 | tee "$OUT_DIR/env.txt"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')

echo "== smoke: TP=1 healthy on CUDA"
timeout -k 10 150 python3 -m watchdog.cli demo --device cuda --no-fallback --tp 1 --requests 16 --timeout 90 \
    --workdir /tmp/gpu-smoke 2>&1 | tee "$OUT_DIR/smoke.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then echo "gpu_checks: smoke failed"; exit 1; fi
cleanup

if [ "${GPU_CHECKS_PYTEST:-1}" != 0 ]; then
    echo "== pytest -m gpu"
    timeout -k 10 "${PYTEST_LIMIT_S:-900}" python3 -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider \
        2>&1 | tee "$OUT_DIR/pytest-gpu.log"
    cleanup
fi

rc=0
for TP in ${GPU_CHECKS_TPS:-1 2 4}; do
    [ "$TP" -le "$NGPU" ] || { echo "== checks TP=$TP: not run ($NGPU GPU(s) visible)"; continue; }
    echo "== checks TP=$TP"
    # shellcheck disable=SC2086  # CHECKS_ARGS: words on purpose
    timeout -k 10 "${CHECKS_LIMIT_S:-600}" python3 -m watchdog.demo.cuda.checks --tp "$TP" --out "$OUT_DIR" \
        ${CHECKS_ARGS:-} 2>&1 | tee "$OUT_DIR/checks-tp$TP.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    cleanup
done
# The incident bundles of the checks (ledgers, stacks, NVML samples, diagnosis), for the record.
tar czf "$OUT_DIR/bundles.tgz" -C /tmp $(cd /tmp && ls -d watchdog-gpu-tp*/*/incidents 2>/dev/null) 2>/dev/null || true
exit $rc
