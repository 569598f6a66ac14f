#!/usr/bin/env bash
# The first GPU run, in one call of at most 600 s on a bare GPU machine (../shared/notes/gpu-device.md):
#
#   .venv/bin/python -m launcher.gpu_wheels      # on the CPU machine: builds .whl/ (fails over 64 MiB)
#   launcher/gpu_run.sh                          # on the GPU machine, carry [".whl"], from the repository root
#
# Parts, in this order, each under its own time limit (the expected times are in the README):
#   install  .whl/*.whl into a scratch site folder, offline (pip --no-index); its bin/ (ninja) on PATH
#   check    imports every package the GPU paths use (.whl/imports.txt) and finds the CUDA device;
#            exits 2 before any test, naming each missing package; lists the test files whose imports
#            this machine lacks (Ray's) and refuses if one of them holds a gpu-marked test
#   clean    removes its work folders ($VLPDIST_GPU_WORK, $OUT/tests, $OUT/bench): a rerun on a warm
#            machine starts like the first
#   tests    every gpu-marked test of every test file (pytest -m gpu), junit in $OUT/tests/
#   bench    python -m launcher.bench --gpu --out $OUT/bench (each section written as it finishes),
#            with the time left of the call
# $OUT/parts.tsv gets one line per finished part (name, exit code, seconds, limit) as it ends, each
# part's log lies in $OUT/<part>.log, and the last lines printed are the parts and bench.md.
#
#   --check-only     install and check, then stop (what the CPU test runs in a fresh venv)
#   --dry-run        on a machine without a GPU: the same parts with no CUDA check, the gpu tests
#                    collected and skipped, and the bench's --quick sizes in place of --gpu
#   --bench-only S   the bench's --only (comma-separated sections)
# Environment: OUT (default runs/gpu_run), PYTHON (python3), VLPDIST_WHEELS (.whl),
# VLPDIST_GPU_WORK (/tmp/vlpdist-gpu-run), VLPDIST_GPU_SITE (/tmp/vlpdist-site).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0 check_only=0 bench_only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --check-only) check_only=1 ;;
        --bench-only) [ $# -ge 2 ] || { echo "error: --bench-only needs a value" >&2; exit 2; }; bench_only="$2"; shift ;;
        *) echo "error: unknown argument $1 (see the head of $0)" >&2; exit 2 ;;
    esac
    shift
done

out="${OUT:-runs/gpu_run}"
python="${PYTHON:-python3}"
wheels="${VLPDIST_WHEELS:-.whl}"
work="${VLPDIST_GPU_WORK:-/tmp/vlpdist-gpu-run}"
site="${VLPDIST_GPU_SITE:-/tmp/vlpdist-site}"
# The call's 600 s less a margin for the machine's own start of the command and the transfer back.
CALL_BUDGET_S=560
LIMIT_INSTALL_S=60 LIMIT_CHECK_S=60 LIMIT_CLEAN_S=15 LIMIT_TESTS_S=220
started=$(date +%s)

mkdir -p "$out"
rm -f "$out/parts.tsv"
export TOKENIZERS_PARALLELISM=false NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"

# part NAME LIMIT COMMAND...: runs COMMAND under LIMIT seconds, its output in $OUT/NAME.log (and
# shown), then appends NAME, exit code, seconds and LIMIT to $OUT/parts.tsv. Returns the exit code.
part() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== ${name} (limit ${limit} s)"
    start=$(date +%s)
    # timeout signals its whole process group, so a part's children (pytest's training runs) stop too.
    timeout --kill-after=5 "$limit" bash -c "$*" 2>&1 | tee "$out/${name}.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" >> "$out/parts.tsv"
    [ "$rc" -eq 124 ] && echo "${name}: stopped at its ${limit} s limit"
    return "$rc"
}

install_wheels() {
    compgen -G "$wheels/*.whl" >/dev/null \
        || { echo "error: no wheels in $wheels: build them on the CPU machine with python -m launcher.gpu_wheels" >&2; return 2; }
    [ -f "$wheels/imports.txt" ] || { echo "error: $wheels/imports.txt is missing: rebuild with python -m launcher.gpu_wheels" >&2; return 2; }
    rm -rf "$site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "$wheels"/*.whl || { echo "error: installing $wheels failed" >&2; return 2; }
    echo "installed $(ls "$wheels"/*.whl | wc -l) wheels into $site"
}

check_imports() {
    "$python" - "$wheels/imports.txt" "$dry_run" "$check_only" "$out/not_collected.txt" <<'PY'
import ast
import importlib
import sys
from pathlib import Path

imports_file, dry_run, check_only = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
wanted = [line.split() for line in Path(imports_file).read_text().splitlines() if line.strip() and not line.startswith("#")]
missing = []
for module, distribution in wanted:
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure to import is the thing to report
        missing.append(f"{module} ({distribution}): {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
print(f"imported {len(wanted) - len(missing)} of {len(wanted)} packages the GPU paths use")
for line in missing:
    print(f"error: missing {line}", file=sys.stderr)
if missing:
    sys.exit(2)
if check_only:
    sys.exit(0)
if not dry_run:
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here (use --dry-run to rehearse on CPU)", file=sys.stderr)
        sys.exit(2)
    print(f"CUDA device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

# Test files whose top-level imports this machine lacks cannot be collected: pytest would stop there.
sys.path[:0] = ["tests", "."]
unusable = []
for test_file in sorted(Path("tests").glob("test_*.py")):
    tree = ast.parse(test_file.read_text())
    roots = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    for root in sorted(roots - {"__future__"}):
        try:
            importlib.import_module(root)
        except ImportError as err:
            if "mark.gpu" in test_file.read_text():
                print(f"error: {test_file} holds gpu tests but cannot be imported here: {err}", file=sys.stderr)
                sys.exit(2)
            unusable.append(test_file)
            print(f"not collected: {test_file} (needs {err.name or root}, not carried)")
            break
Path(sys.argv[4]).write_text("".join(f"{path}\n" for path in unusable))
PY
}

clean_work() {
    rm -rf "$work" "$out/tests" "$out/bench"
    mkdir -p "$work" "$out/tests" "$out/bench"
    echo "removed and recreated $work, $out/tests, $out/bench"
}

run_gpu_tests() {
    local ignores=()
    while read -r path; do [ -n "$path" ] && ignores+=("--ignore=$path"); done < "$out/not_collected.txt"
    "$python" -m pytest -m gpu -q -p no:cacheprovider -rs --basetemp "$work/pytest" --junitxml "$out/tests/junit.xml" \
        ${ignores[@]+"${ignores[@]}"} tests
}

run_bench() {
    local mode=--gpu
    [ "$dry_run" -eq 1 ] && mode=--quick
    RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29511}" \
        "$python" -m launcher.bench "$mode" ${bench_only:+--only "$bench_only"} --out "$out/bench" --work "$work/bench"
}

export out python wheels work site dry_run check_only bench_only
export -f install_wheels check_imports clean_work run_gpu_tests run_bench

summary() {
    echo "== parts (name, exit code, seconds, limit): $(( $(date +%s) - started )) s in all"
    cat "$out/parts.tsv"
    [ -f "$out/bench/bench.md" ] && cat "$out/bench/bench.md"
}

part install "$LIMIT_INSTALL_S" install_wheels || { summary; exit 2; }
part check "$LIMIT_CHECK_S" check_imports || { summary; exit 2; }
[ "$check_only" -eq 1 ] && { summary; exit 0; }
part clean "$LIMIT_CLEAN_S" clean_work || { summary; exit 2; }
part tests "$LIMIT_TESTS_S" run_gpu_tests
tests_rc=$?
bench_limit=$(( CALL_BUDGET_S - ($(date +%s) - started) ))
[ "$bench_limit" -ge 1 ] || bench_limit=1  # timeout 0 would mean no limit
part bench "$bench_limit" run_bench
bench_rc=$?
summary
echo "gpu run: tests exit ${tests_rc}, bench exit ${bench_rc}; everything under ${out}"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
