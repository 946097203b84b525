#!/usr/bin/env bash
# Set up from scratch and run the whole test suite (README command 2; .ci/run calls this).
# - a venv in .venv (reused if present), torch 2.14.1 / torchvision 0.29.1, this package with its test extras;
# - the authors' MedCLIP 0.0.3 with transformers 4.24.0 in an isolated target dir (.ci/ref) for the parity tests;
# - pytest over the whole suite, slow tests included, one pytest-xdist worker per core (at most 8): much of the suite
#   is subprocesses importing torch and open_clip on one core, so 2 workers on 2 cores take ~2/3 of the serial time;
#   one OpenMP thread per process (unless OMP_NUM_THREADS is set) keeps the workers from oversubscribing the cores
#   (tests/benchmarks/bench_suite.py measures both).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # a fresh venv with torch 2.14.1 (a CUDA build on x86_64) takes ~6.6 GiB; fail clearly, not midway through pip
  free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
    echo "tests/run.sh: only $((free_kib / 1024)) MiB free under $PWD; the new .venv needs about 7 GiB." >&2
    df -h . >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[test,demo]"
REF_DIR=${MEDCLIP_REFERENCE_PATH:-$PWD/.ci/ref}
if [ ! -d "$REF_DIR/medclip" ]; then
  python -m pip install -q --target "$REF_DIR" --no-deps \
    medclip==0.0.3 transformers==4.24.0 tokenizers==0.13.3 huggingface-hub==0.36.2 nltk==3.9.2
fi
export MEDCLIP_REFERENCE_PATH="$REF_DIR" MEDCLIP_REQUIRE_REFERENCE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ruff check .
python -m pytest -n auto --maxprocesses 8 --dist worksteal -q "$@"
