#!/usr/bin/env bash
# The GPU smoke check, in one short run on a machine with one CUDA device: the `gpu` tests (one
# rank on NCCL in bf16 for 20 steps at ep_size 1 with every vlpdist collective checked to be on the
# GPU; the folded mapper equal to the MoE mapper on the GPU), then the training benchmark at
# GPT-2 small's width and depth. Prints both and a one-line verdict; copies them to $OUT if set.
#
#   launcher/gpu_smoke.sh            # from the repository root, in an environment with .[train,process]
#
# A machine without the project's packages (no network) takes them as wheels carried in .whl/
# (built on a networked machine: `pip wheel --no-deps -w .whl deepspeed` plus `pip download
# --no-deps --only-binary=:all: --python-version <its python> -d .whl open_clip_torch webdataset
# omegaconf antlr4-python3-runtime hjson ninja py-cpuinfo ftfy wcwidth braceexpand pydantic
# pydantic-core annotated-types typing-inspection`): they are installed into a scratch folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_smoke}"
mkdir -p "$out"
. launcher/gpu_wheels.sh
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
    || { echo "error: no CUDA device here; the GPU smoke check needs one" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
python3 launcher/bench_train.py --batch 256 --width 768 --layers 12 --steps 10 --rounds 3 2>&1 | tee "$out/bench_train.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu smoke: pytest -m gpu exit ${tests_rc}; bench_train exit ${bench_rc}; outputs in ${out}"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
