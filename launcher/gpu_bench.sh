#!/usr/bin/env bash
# The benchmark suite's GPU mode in one short run on a machine with one CUDA device: bf16, the
# frozen LM and the mapper compiled, prefix 10 + 40 caption tokens at batch 256. Prints one table
# (the suite's bench.md): the full training step vs the bare compiled frozen-LM step (goal >= 0.85)
# and its samples/s (goal > 8,000; ClipCap's published step did 778), the CLIP image tower inside
# the processing stage vs the bare tower (ViT-B-32, batch 1024, goal >= 0.9), the folded vs the MoE
# mapper, and the k-NN graph of 1M x 512 by torch brute force (goal <= 3 s). bench.json and the log
# go to $OUT (or runs/gpu_bench).
#
#   launcher/gpu_bench.sh            # from the repository root
#
# Without a CUDA device it says so and runs the CPU suite's --quick form instead (the same code
# paths at small sizes), so the script itself is checked on any machine.
#
# A machine without the project's packages (no network) takes them as wheels carried in .whl/:
# see ../shared/notes/gpu-device.md (deepspeed, open_clip_torch, webdataset, faiss-cpu, hjson, ninja,
# py-cpuinfo, ftfy, wcwidth, braceexpand, pydantic, pydantic-core, annotated-types,
# typing-inspection, omegaconf, antlr4-python3-runtime, jsonschema and its dependencies); they are
# installed into a scratch folder first. img2dataset is not carried there: the ingestion section
# then reports itself unavailable and the CLIP section writes its raw shards directly.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_bench}"
mkdir -p "$out"
. launcher/gpu_wheels.sh
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
export TOKENIZERS_PARALLELISM=false NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
if "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
    export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29511}"
    "$python" -m launcher.bench --gpu --out "$out" --work /tmp/vlpdist-gpu-bench > "$out/bench.log" 2>&1
    rc=$?
else
    echo "no CUDA device here: running the CPU suite's --quick form instead (the GPU figures need a GPU)" | tee "$out/device.txt"
    "$python" -m launcher.bench --quick --out "$out" > "$out/bench.log" 2>&1
    rc=$?
fi
[ "$rc" -eq 0 ] || tail -n 40 "$out/bench.log" >&2
[ -f "$out/bench.md" ] && cat "$out/bench.md"
echo "gpu bench: exit ${rc}; bench.json, bench.md and bench.log in ${out}"
exit "$rc"
