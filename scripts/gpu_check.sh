#!/usr/bin/env bash
# One-shot check on a CUDA machine, ending within 9 minutes, compiles included: the GPU-marked tests,
# the eager bench at the paper's model size, the fast regime with CUDA graphs and compiled at batch 64
# and at the bench's best batch, 4 packed batch-64 runs of the fast regime (4 processes training at
# once on the GPU), and a 2-epoch ViT-B/16 run with CUDA graphs on a small synthetic set.
# Each step has its own timeout, cut to what is left of the 9 minutes. $OUT (else ./gpu_check_out) gets
# at most 8 files: summary.json, bench.json and one log per step; scratch files go to a temporary folder.
# Run from the repository root:  bash scripts/gpu_check.sh
# Rehearsal before spending a GPU slot: GPU_CHECK_SCALE=tiny GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh
# runs the same steps with the tiny model at small sizes (tests/test_gpu_check.py does).
# $PYTHON (default python3, the interpreter that holds torch on a GPU image) runs every step; a machine without
# php-run's other dependencies and no package index gets them as wheels from scripts/gpu_wheels.sh.
set -uo pipefail
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
export PYTHON="${PYTHON:-python3}"
case "${GPU_CHECK_SCALE:-paper}" in
    paper) CLIP=ViT-B/16 BATCH=64 MAX_BATCH=512 PACKED=4 BENCH_SIZES=()
           MODEL_TOML='clip = "ViT-B/16"
image_size = [384, 128]
cnum = 9
reduction = 8
efp_layers = 4
efp_heads = 8' ;;
    tiny)  CLIP=tiny BATCH=8 MAX_BATCH=16 PACKED=2
           BENCH_SIZES=(--pipeline-images 64 --scoring-queries 256 --scoring-gallery 256 --workers 0)
           MODEL_TOML='clip = "tiny"' ;;
    *) echo "GPU_CHECK_SCALE: expected paper or tiny, got ${GPU_CHECK_SCALE}" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PHP_RUN_CACHE="$WORK/image_cache" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
DEADLINE=$((SECONDS + 540))
STEPS="$WORK/steps.tsv"
: >"$STEPS"

step() {  # step NAME SECONDS COMMAND...: run under a timeout, log to $OUT/NAME.log, record the exit code
    local name="$1" budget="$2"; shift 2
    local left=$((DEADLINE - SECONDS - 10))
    [ "$budget" -le "$left" ] || budget=$left
    if [ "$budget" -lt 5 ]; then
        printf '%s\tskipped\t0\n' "$name" >>"$STEPS"; return
    fi
    local started=$SECONDS
    echo "== $name (timeout ${budget}s): $*"
    timeout -k 5 "$budget" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >>"$STEPS"
    echo "   exit $rc after $((SECONDS - started))s"
}

step machine 20 bash -c 'nvidia-smi; "$PYTHON" - <<"PY"
import platform, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "python", platform.python_version())
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
PY'

step gpu_tests 90 "$PYTHON" -m pytest -o addopts= -m gpu -q -rs -p no:cacheprovider

# Eager only; the compiled regime is timed below at two batches. Writes reports/ in the scratch folder.
step bench_eager 150 bash -c "cd '$WORK' && '$PYTHON' -m php_runner bench --device $DEVICE --clip $CLIP \
    --batch-size $BATCH --no-compile --packed 0 --max-batch $MAX_BATCH ${BENCH_SIZES[*]} --json >'$OUT/bench.json'"

step compiled_fast 200 "$PYTHON" - "$OUT/bench.json" "$DEVICE" "$CLIP" "$BATCH" <<'PY'
import json, sys
from php_runner.engine.benchmark import BenchSizes, training_samples_per_s
from php_runner.model.config import ClipConfig, PHPConfig
bench, device, clip, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
best = json.load(open(bench))["train"]["fast"]["largest_batch"]
config = PHPConfig(clip=ClipConfig()) if clip == "ViT-B/16" else PHPConfig.tiny()
sizes = BenchSizes(steps=10, warmup=3)
for variant in ("cuda_graphs", "compile"):  # CUDA graphs first: the variant the issue targets
    for batch in sorted({batch_size, best}):
        rate = training_samples_per_s(config, "fast", batch, sizes, device, **{variant: True})
        print(json.dumps({"variant": variant, "batch": batch, "samples_per_s": rate}), flush=True)
PY

# Packed: N processes each training the fast regime eagerly at batch 64, timed together (arguments: device,
# model size, batch, processes, seconds to wait for them; on the CPU: cpu tiny 2 2 300). A file, not stdin:
# the spawned processes re-import the main script, guarded by __name__.
cat >"$WORK/packed.py" <<'PY'
import json, sys
import torch
from php_runner.engine.bench_regime import BenchSizes
from php_runner.engine.packed_benchmark import packed_training
from php_runner.model.config import ClipConfig, PHPConfig
if __name__ == "__main__":
    device, clip, batch, runs, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    config = PHPConfig(clip=ClipConfig()) if clip == "ViT-B/16" else PHPConfig.tiny()
    sizes = BenchSizes(batch_size=batch, steps=10, warmup=3, packed_runs=runs, packed_regime="fast")
    packed = packed_training(config, sizes, torch.device(device), timeout=timeout)
    print(json.dumps({"packed": packed}), flush=True)
PY
step packed 70 "$PYTHON" "$WORK/packed.py" "$DEVICE" "$CLIP" "$BATCH" "$PACKED" 80

mkdir -p "$WORK/specs"
SHIPPED=$("$PYTHON" -c "from php_runner.cli.common import specs_folder; print(specs_folder())")
cp "$SHIPPED/base.toml" "$SHIPPED/presets.toml" "$WORK/specs/"
cat >"$WORK/specs/gpu_check_run.toml" <<TOML
description = "gpu_check: 2 epochs of $CLIP (random weights) on the small synthetic CUHK-PEDES, amp"
extends = "base"
datasets = ["CUHK-PEDES"]
seeds = [1]
[model]
$MODEL_TOML
[train]
epochs = 2
batch_size = $BATCH
precision = "amp"
TOML
# The fastest runtime settings: the tiny preset's runtime with CUDA graphs (runtime fields live in presets).
sed -i 's/^\[tiny.runtime\]$/[tiny.runtime]\ncuda_graphs = true/' "$WORK/specs/presets.toml"
# From the scratch folder: the run writes checkpoints/ and logs/ (its official run folder) where it runs.
step run_2_epochs 150 bash -c "cd '$WORK' && '$PYTHON' -m php_runner run specs/gpu_check_run.toml --preset tiny \
    --device $DEVICE --data-root data --db sqlite:///registry.db"

"$PYTHON" - "$STEPS" "$OUT" >"$OUT/summary.json" <<'PY'
import json, sys
steps = [dict(zip(("step", "exit", "seconds"), line.split("\t"))) for line in open(sys.argv[1]).read().splitlines()]
summary = {"steps": steps, "ok": all(step["exit"] == "0" for step in steps)}
try:
    bench = json.load(open(f"{sys.argv[2]}/bench.json"))
    summary["projection"] = bench.get("projection")
    summary["train"] = {name: {k: entry.get(k) for k in ("samples_per_s", "largest_batch", "largest_batch_samples_per_s")}
                        for name, entry in bench.get("train", {}).items()}
except (OSError, ValueError) as err:
    summary["bench_error"] = str(err)
try:
    summary["compiled_fast"] = [json.loads(line) for line in open(f"{sys.argv[2]}/compiled_fast.log")
                                if line.startswith("{")]
except OSError:
    pass
try:
    summary["packed"] = next(json.loads(line)["packed"] for line in open(f"{sys.argv[2]}/packed.log")
                             if line.startswith('{"packed"'))
except (OSError, StopIteration):
    pass
print(json.dumps(summary, indent=1))
PY
rm -rf "$WORK"
grep -q '"ok": true' "$OUT/summary.json"
