#!/usr/bin/env bash
# One short GPU check of `make bench`, sized for a ~5 minute slot on one H200.
#
# Prepare on the CPU machine (the device machine has no network and no ../shared/data):
#     bash scripts/gpu_check.sh --prepare      # writes results/gpu_data/{train,dev,test}.npz from the split,
#                                              # and a 1,060-image tree for the tests (25 MB in all)
# Then on the device machine, from the repository root, carrying that folder:
#     run(command="bash scripts/gpu_check.sh", carry=["results/gpu_data"], timeout_s=420)
# What comes back is in $OUT (default ./gpu_out): gpu_check.log, bench.json, env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--prepare" ]; then
    exec "$PY" - <<'PYEOF'
"""Write the user's split as train/dev/test .npz files: a DATA folder the device machine can read."""
import os
from pathlib import Path
import numpy as np
from cnnlib.splits import DataConfig, prepare_splits
source = Path(os.environ.get("DATA") or "../shared/data/cifar10-cars-trucks-cats")
splits = prepare_splits(DataConfig(source), Path(os.environ.get("RESULTS", "results")) / "data")
out = Path("results/gpu_data")
out.mkdir(parents=True, exist_ok=True)
for name, split in splits.named().items():
    np.savez(out / f"{name}.npz", images=split.images, labels=split.labels, ids=split.ids)
    print(f"{out / (name + '.npz')}: {len(split)} images")
# A small image tree for the tests that read the real set (TEST_DATA): enough for tests/test_fused.py.
import shutil
for folder, counts in (("train", {"car": 600, "truck": 200, "cat": 200}), ("test", {"car": 20, "truck": 20, "cat": 20})):
    for cls, count in counts.items():
        target = out / "tree" / folder / cls
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted((source / folder / cls).iterdir())[:count]:
            shutil.copy(image, target / image.name)
print(f"{out / 'tree'}: a 1,060-image tree for the tests")
PYEOF
fi

OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.txt"

# The device image's python3 holds torch and torchvision; it cannot fetch anything.
"$PY" -c "import torch, torchvision, numpy, PIL" || { echo "FAILED: torch/torchvision not importable with $PY"; exit 3; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
    | tee -a "$OUT/env.txt"

DATA=${DATA:-../shared/data/cifar10-cars-trucks-cats}
[ -d "$DATA" ] || DATA=results/gpu_data
[ -f "$DATA/train.npz" ] || [ -d "$DATA/train" ] || { echo "FAILED: no data at $DATA (run --prepare and carry results/gpu_data)"; exit 4; }
echo "== data: $DATA"

# The fused step's CUDA path, eager and as a CUDA graph, against separate runs (where pytest exists).
if "$PY" -c "import pytest" 2>/dev/null; then
    echo "== fused equivalence on cuda"
    TEST_DATA=results/gpu_data/tree timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py \
        -k "graphs or runs_on_the_test_device or matches_separate" 2>&1 | tail -5
else
    echo "== fused equivalence: pytest is not installed here; the bench's eager-vs-graph dev accuracies stand in"
fi

# The bench module is driven directly (not `python -m study`) so that commands whose
# dependencies the device lacks (optuna, plotly, ...) cannot stop it from loading.
# Full settings (batch 16/32/128, 1 warm-up + 3 timed epochs, seeds 0,1,2), the
# levers A/B (channels-last, fused optimizer, cudnn.benchmark), the 100-epoch recipe, then horizontally fused trials when study.bench.fused exists;
# bench.json is written before the fused part, so a slow or failing fused part loses nothing.
# BENCH_ARGS appends options (later ones win), e.g. a dry run here:
#     OUT=/tmp/gpu_out BENCH_ARGS="--device cpu --quick --recipe-epochs 2" bash scripts/gpu_check.sh
PYTHONUNBUFFERED=1 timeout 400 "$PY" - "$DATA" "$OUT" <<'PYEOF'
import argparse, os, shlex, shutil, sys, time
from pathlib import Path
from study.bench import command as bench
data, out = sys.argv[1], Path(sys.argv[2])
parser = argparse.ArgumentParser()
bench.add_arguments(parser)
args = parser.parse_args(["--device", "cuda", "--data", data, "--results", "/tmp/gpu_check_results",
                          "--epochs", "5", "--levers", "--recipe-epochs", "100", "--fused-ks", "1,64,256,1024",
                          "--fused-graphs",
                          *shlex.split(os.environ.get("BENCH_ARGS", ""))])
started = time.perf_counter()
code = bench.run(args)
print(f"== bench finished with {code} in {time.perf_counter() - started:.0f} s")
shutil.copy("/tmp/gpu_check_results/bench/bench.json", out / "bench.json")  # the split cache stays behind
sys.exit(code)
PYEOF
code=$?
[ -f "$OUT/bench.json" ] || cp /tmp/gpu_check_results/bench/bench.json "$OUT/bench.json" 2>/dev/null
echo "== exit $code"
exit $code
