#!/usr/bin/env bash
# The depth-and-width family's fine-tuning grid on one GPU in one call of at most 8 minutes (prepared, not run yet):
#   run(command="bash experiments/gpu/run_depth_grid.sh", timeout_s=500)
# The pretrained members travel committed in experiments/depth_family/models/ (lnfree.sweeps.pretrain_depth --save; about 22 MB)
# and are restored into .famcache; the members that are not committed are pretrained here first, 8 at a time on
# the one GPU, fp32, within PRETRAIN_TIMEOUT (8000 steps took the width family's recipe about 6 minutes on the
# H200 for 3000 steps x 12 runs at once, so budget ~6 minutes: then the grid is left for the next call); the
# finished ones come back in $OUT/models/ (to commit into experiments/depth_family/models/) with their run dirs'
# records in $OUT/pretrain_runs/ (`python -m lnfree.analysis.family` reads them). Then the LR probe (lnfree.sweeps.lr_probe: vanilla control only, writes lr.json) and
# every job of experiment=data_scaling_depth without a record in experiments/depth_family/runs.jsonl, as
# Hydra multiruns, WORKERS at a time, fp32 like the CPU runs: the fixed grid's first, then the stage-2 extension's
# (budgets 1024-4096 steps, --extend; experiments/depth_family/README.md "Grid extension"), smallest budgets first. Each phase has a time limit so that the records of
# what finished come back: $OUT/runs.jsonl, $OUT/lr.json (and the logs); the rest is picked up by
# `make scaling-depth` on the CPU from the same records. Needs, like run_sweep.sh, the wheels the device image
# lacks in .whl/ (carry=[".whl"] when it is git-ignored). Estimate: 452 runs (84 probe, 368 grid) with 69k
# optimizer steps in all; at 10-20 ms a step and about 15 s per multirun process on 16 streams, 5-7 minutes.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && cp -r .whl/antlr4 /tmp/site/ && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
WORKERS=${WORKERS:-16}
CACHE=$PWD/.famcache
EXTRA="hardware=gpu hardware.precision=32-true"
nvidia-smi -L
t0=$(date +%s)
timeout ${PRETRAIN_TIMEOUT:-400} python3 -m lnfree.sweeps.pretrain_depth --cache-dir $CACHE --jobs 8 \
  --extra $EXTRA > $OUT/pretrain.log 2>&1
echo "pretraining: $(( $(date +%s) - t0 )) s"; grep -E "rc=|in the cache|restored" $OUT/pretrain.log
for d in $CACHE/models/*/; do n=$(basename $d)
  [ -f $d/pretrain_info.json ] && [ ! -d experiments/depth_family/models/$n ] && mkdir -p $OUT/models && cp -r $d $OUT/models/
done
mkdir -p $OUT/pretrain_runs && for d in $CACHE/pretrain_runs/*/; do n=$(basename $d); mkdir -p $OUT/pretrain_runs/$n
  cp $d/summary.json $OUT/pretrain_runs/$n/ 2>/dev/null; cp -r $d/csv $OUT/pretrain_runs/$n/ 2>/dev/null; done
timeout ${PROBE_TIMEOUT:-150} python3 -m lnfree.sweeps.lr_probe --workers $WORKERS --cache-dir $CACHE \
  --extra $EXTRA > $OUT/probe.log 2>&1
echo "probe: $(( $(date +%s) - t0 )) s"; tail -n 6 $OUT/probe.log
timeout ${GRID_TIMEOUT:-280} python3 -m lnfree.sweeps.run_missing --experiment data_scaling_depth --extend \
  --workers $WORKERS --cache-dir $CACHE --extra $EXTRA > $OUT/grid.log 2>&1
echo "probe + grid: $(( $(date +%s) - t0 )) s"; tail -n 3 $OUT/grid.log
# records of runs that finished after their multirun was cut off by the time limit
python3 -c "
import sys
from lnfree.sweeps import run_missing as rm
print(rm.harvest(rm.DEPTH_OUT, rm.DEPTH_RECORDS, sys.argv[1]), 'more recorded')" $CACHE
cp experiments/depth_family/runs.jsonl experiments/depth_family/lr.json $OUT/ 2>/dev/null
wc -l $OUT/runs.jsonl; ls -la $OUT
