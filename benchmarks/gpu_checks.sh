#!/usr/bin/env bash
# The GPU checks of issue 30, as one prepared run on a lent GPU machine (never part of CI).
#
#   bash benchmarks/gpu_checks.sh prepare   # here: wheels the GPU image lacks -> .whl/, the small real CT
#                                           # crops -> .gpu_data/ (both listed in .git/info/exclude)
#   then, through the device tool:  run(command="bash benchmarks/gpu_checks.sh run",
#                                       carry=[".whl", ".gpu_data"], timeout_s=590)
#
# "run" installs the wheels into /tmp/site and writes under $OUT (or ./gpu_out): the slow and GPU tests
# (tests.log), MAISI features of a 256^3 volume at fp16 and bf16 with time and peak GPU memory (random
# full-size weights: the pretrained ones cannot be fetched; maisi.json), and register, match and ConvexAdam
# on the GPU side by side on the pulmonary and elastix crops (synthetic pairs; registration_gpu.json).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in
prepare)
    set -e
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.gpu_data/' .git/info/exclude || echo '/.gpu_data/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "SimpleITK>=2.3" "monai>=1.4,<1.7" "convexAdam>=0.2" "nibabel>=5"
    data=${MEDDIFT_DATA:-../shared/data}
    rm -rf .gpu_data && mkdir -p .gpu_data/chestct_single_real
    for crop in totalseg_pulmonary_crop elastix_lung_baseline_small; do
        cp -r "$data/chestct_single_real/$crop" .gpu_data/chestct_single_real/
    done
    du -sh .whl .gpu_data
    ;;
run)
    out=${OUT:-gpu_out}
    mkdir -p "$out" && out=$(cd "$out" && pwd)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD MEDDIFT_DATA=$PWD/.gpu_data PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or slow" Testing/test_maisi_backbone.py \
        Testing/test_field.py Testing/test_eval.py 2>&1 | tail -40 > "$out/tests.log"
    (cd benchmarks && timeout 150 python3 maisi_features.py --cases 256 --precisions fp16 bf16 --device cuda \
        --json "$out/maisi.json") 2>&1 | tail -20 > "$out/maisi.log"
    (cd benchmarks && timeout 180 python3 registration.py --cases pulmonary elastix --seeds 0 --threads 8 \
        --methods convexadam meddift-mind match-mind --device cuda --results "$out/registration_gpu.json" \
        --out "$out/registration") 2>&1 | tail -20 > "$out/registration.log"
    tail -n 5 "$out"/*.log
    ;;
*)
    echo "usage: bash benchmarks/gpu_checks.sh prepare|run" >&2
    exit 2
    ;;
esac
