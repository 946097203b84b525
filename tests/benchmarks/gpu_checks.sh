#!/usr/bin/env bash
# The GPU checks of issue #4, as one run on a lent GPU machine: loss micro-benchmark (soft vs ClipLoss) and
# medclip-swin training-step throughput / MFU in OpenCLIP's train_one_epoch (bf16, batch 128), with the
# clip-loss, channels-last and torch.compile variants side by side on the same card.
#
#   bash tests/benchmarks/gpu_checks.sh [OUT_DIR]
#
# If ./.whl holds wheels (packages the GPU image lacks, this project's own wheel included) they are installed
# into /tmp/site first, without touching the image's torch. JSON lines go to OUT_DIR/gpu_checks.jsonl.
set -uo pipefail
out=${1:-${OUT:-gpu_checks_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
cd /tmp  # import the installed package, not the source tree (plugins/ maps to open_clip_medclip.plugins)
repo=$OLDPWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, open_clip, transformers, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"

jsonl="$out/gpu_checks.jsonl"
: >"$jsonl"
run() {  # run NAME SECONDS CMD...: keep the JSON lines, carry on if one variant fails
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^WARNING' ; local rc=${PIPESTATUS[0]}
    grep '^{' "$out/$name.log" >>"$jsonl"
    [ "$rc" = 0 ] || echo "!! $name exited $rc"
}
bench="$repo/tests/benchmarks"
run swin_soft 120 python3 "$bench/gpu_train_throughput.py"
run swin_clip 120 python3 "$bench/gpu_train_throughput.py" --loss clip
run loss 90 python3 "$bench/bench_loss.py" --device cuda --repeats 50 --batch-sizes 256 1024 4096 16384 --kernels auto square
run swin_soft_cl 120 python3 "$bench/gpu_train_throughput.py" --channels-last
run swin_soft_b256 120 python3 "$bench/gpu_train_throughput.py" --batch-size 256
run swin_soft_compile 200 python3 "$bench/gpu_train_throughput.py" --compile --warmup-steps 8
echo "== done; JSON lines in $jsonl"
