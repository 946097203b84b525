#!/usr/bin/env bash
# The GPU checks of issue 15, as one run (about 8 minutes on one H100/H200):
#  1. the loss on its own: SemanticMatchingLoss (grouped and dense targets) vs ClipLoss, forward+backward time and
#     peak memory at 4k-16k per batch, and rank 0 of a simulated --local-loss run at global batch 32k on 8 ranks;
#  2. medclip-swin training steps in OpenCLIP's train_one_epoch (bf16, fused AdamW, SDPA text attention, fused Swin
#     attention): samples/s and MFU, eager and compiled, batch 128 and 256, soft and clip loss, texts of real IU
#     sentences trimmed per batch; medclip-swin-masked eager batch 128 with the trimmed text tower and then the
#     padding-free one (--medclip-padding-free), side by side; last, eager batch 128 with 77-token texts (the old
#     baseline) for comparison.
#
#   bash tests/benchmarks/gpu_checks.sh [OUT_DIR]      # default tests/benchmarks/results/gpu_checks
#
# If ./.whl holds wheels (packages the GPU image lacks, this project's own wheel included) they are installed
# into /tmp/site first, without touching the image's torch. Every variant has its own time limit, so a slow
# compile cannot eat the others; the cheap, most important runs go first. Output: OUT_DIR/gpu_checks.jsonl (one
# JSON line per measurement), OUT_DIR/bench_loss_gpu.json, OUT_DIR/gpu_checks.json (all lines + provenance), logs.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-${OUT:-$repo/tests/benchmarks/results/gpu_checks}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$repo"/.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    cd /tmp  # import the installed package, not the source tree (plugins/ maps to open_clip_medclip.plugins)
fi
started=$(date +%s)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia_smi.csv"
python3 -c "import torch, open_clip, transformers, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"

jsonl="$out/gpu_checks.jsonl"
: >"$jsonl"
run() {  # run NAME SECONDS CMD...: keep the JSON lines, carry on if one variant fails or runs out of time
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s, $(($(date +%s) - started))s elapsed)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^WARNING' ; local rc=${PIPESTATUS[0]}
    grep '^{' "$out/$name.log" | sed "s/^{/{\"check\": \"$name\", /" >>"$jsonl"
    [ "$rc" = 0 ] || echo "!! $name exited $rc"
}
bench="$repo/tests/benchmarks"
step="$bench/gpu_train_throughput.py"
run loss 60 python3 "$bench/bench_loss.py" --device cuda --repeats 20 --batch-sizes 4096 8192 16384 \
    --targets auto dense --local-loss-batch 32768 --world-size 8 --local-repeats 10 \
    --machine "$gpu" --out "$out/bench_loss_gpu.json"
run eager_b128 70 python3 "$step" --batch-size 128 --loss soft clip
run eager_b256 60 python3 "$step" --batch-size 256 --loss soft clip
run eager_b128_masked_padding_free 60 python3 "$step" --model medclip-swin-masked --batch-size 128 --loss soft \
    --padding-free both --steps 20
run compiled_b128 130 python3 "$step" --batch-size 128 --loss soft clip --compile
run compiled_b256 100 python3 "$step" --batch-size 256 --loss soft clip --compile
run eager_b128_padded77 35 python3 "$step" --batch-size 128 --loss soft --text-width padded --steps 20

python3 - "$jsonl" "$out/gpu_checks.json" "$gpu" "$bench" <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[4])
from benchresults import provenance
lines = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
record = provenance(sys.argv[4] + "/gpu_checks.sh", [], sys.argv[3])
record["command"] = "bash tests/benchmarks/gpu_checks.sh"
record["results"] = {"measurements": lines}
with open(sys.argv[2], "w") as handle:
    json.dump(record, handle, indent=2)
print(f"{len(lines)} measurements -> {sys.argv[2]}")
EOF
echo "== done in $(($(date +%s) - started))s; JSON lines in $jsonl"
