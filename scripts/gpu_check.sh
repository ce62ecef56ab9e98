#!/usr/bin/env bash
# One-shot check on a CUDA machine (never run on a CPU-only one): the GPU-marked tests, the bench at
# the paper's model size, and a 2-epoch tiny reproduce on CUDA in both precisions.
# Output goes to $OUT when set (else ./gpu_check_out); run from the repository root:
#   bash scripts/gpu_check.sh
set -uo pipefail
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PHP_RUN_CACHE="${PHP_RUN_CACHE:-$OUT/image_cache}"
status=0
step() {  # step NAME COMMAND...: run, keep its log, remember a failure, carry on
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

python - >"$OUT/machine.txt" 2>&1 <<'PY'
import torch, torchvision, platform
print("torch", torch.__version__, "torchvision", torchvision.__version__, "python", platform.python_version())
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
PY
nvidia-smi >>"$OUT/machine.txt" 2>&1 || true

step gpu_tests python -m pytest -m gpu -q -rs
step bench_vitb16 python -m php_runner bench --device cuda --clip ViT-B/16 --json
cp reports/benchmarks.md reports/benchmarks.jsonl "$OUT/" 2>/dev/null || true

# A 2-epoch tiny reproduce on CUDA, official and amp, through the registry like any run.
SPECS="$OUT/specs"
mkdir -p "$SPECS"
SHIPPED=$(python -c "from php_runner.cli.common import specs_folder; print(specs_folder())")
cp "$SHIPPED/base.toml" "$SHIPPED/presets.toml" "$SPECS/"
cat >"$SPECS/gpu_tiny.toml" <<'TOML'
extends = "base"
datasets = ["CUHK-PEDES"]
seeds = [1]
[grid]
"train.epochs" = [2]
"train.precision" = ["official", "amp"]
TOML
step reproduce_tiny_cuda python -m php_runner run "$SPECS/gpu_tiny.toml" --preset tiny --device cuda \
    --data-root "$OUT/data" --db "sqlite:///$OUT/registry.db"
step status python -m php_runner status --db "sqlite:///$OUT/registry.db" --json

echo "overall exit $status" | tee -a "$OUT/summary.txt"
exit "$status"
