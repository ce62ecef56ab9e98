#!/usr/bin/env bash
# The wheels a GPU machine without a package index needs to run php-run (scripts/gpu_check.sh): php-run's
# dependencies resolved for CPython 3.12 on x86-64 Linux, less the packages that machine already holds and
# less its GPU stack (torch, torchvision, triton, nvidia-*, cuda-*: the machine's own, matching its driver),
# downloaded without their dependencies into $GPU_WHEELS_DIR (default .whl, git-ignored).
# Usage, from the repository root:  bash scripts/gpu_wheels.sh [PRESENT]
#   PRESENT: the machine's packages, one name (or name==version) per line, '#' comments allowed; default
#   scripts/gpu_image_packages.txt. On the machine:  python3 -m pip list --format=freeze > present.txt
# There:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
PRESENT="${1:-scripts/gpu_image_packages.txt}"
WHEELS="${GPU_WHEELS_DIR:-.whl}"
PIP="${GPU_WHEELS_PIP:-python3 -m pip}"
[ -f "$PRESENT" ] || { echo "gpu_wheels.sh: $PRESENT: no such file (the GPU machine's package list)" >&2; exit 2; }
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
SCRATCH=$(mktemp -d /tmp/gpu_wheels.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT

echo "resolving php-run's dependencies for cp312 x86-64 Linux (a minute or two)" >&2
$PIP install -q --dry-run --ignore-installed --report "$SCRATCH/report.json" --target "$SCRATCH/target" "${TARGET[@]}" .
python3 - "$SCRATCH/report.json" "$PRESENT" >"$SCRATCH/needed.txt" <<'PY'
import json, re, sys

def normalised(name: str) -> str:  # PEP 503: case, '-', '_' and '.' are the same
    return re.sub(r"[-_.]+", "-", name).lower()

report, present_file = sys.argv[1:]
present = {normalised(re.split(r"[=<>~!\s]", line.strip(), maxsplit=1)[0])
           for line in open(present_file) if line.strip() and not line.lstrip().startswith("#")}
gpu_stack = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
for item in json.load(open(report))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if "dir_info" in item["download_info"]:
        continue  # a local folder, the project itself: it travels as source
    if normalised(name) not in present and not gpu_stack.match(normalised(name)):
        print(f"{name}=={version}")
PY
mkdir -p "$WHEELS"
if [ -s "$SCRATCH/needed.txt" ]; then
    $PIP download -q --no-deps "${TARGET[@]}" -d "$WHEELS" -r "$SCRATCH/needed.txt"
fi
echo "$(wc -l <"$SCRATCH/needed.txt") wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)): $(tr '\n' ' ' <"$SCRATCH/needed.txt")" >&2
