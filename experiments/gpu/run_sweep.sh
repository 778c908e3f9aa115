#!/usr/bin/env bash
# The data-scaling sweep (experiment=data_scaling) on one GPU: the 12 (size, arm) groups as parallel Hydra
# multiruns (27 jobs each: 9 budgets x 3 seeds), fp32. Family members not shipped travel in .famcache/models.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && cp -r .whl/antlr4 /tmp/site/ && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/sweep
nvidia-smi -L
t0=$(date +%s)
for m in w48 w64 w96 w128 w192 w256; do for s in none scaled; do
  timeout ${SWEEP_TIMEOUT:-420} python3 -m lnfree.train -m experiment=data_scaling model=builtin_$m schedule=$s \
    hardware=gpu hardware.precision=32-true paths.cache_dir=$PWD/.famcache hydra.sweep.dir=/tmp/sweep/$m-$s \
    > /tmp/sweep/$m-$s.log 2>&1 &
done; done
wait
echo "sweep: $(( $(date +%s) - t0 )) s"; ls /tmp/sweep/*/ -d | wc -l; find /tmp/sweep -name summary.json | wc -l
grep -l "Error" /tmp/sweep/*.log | head; tail -n 5 /tmp/sweep/w256-scaled.log
(cd /tmp && tar czf $OUT/sweep.tgz sweep/*.log $(cd /tmp && find sweep -name summary.json) $(cd /tmp && find sweep -path '*/csv/*' -name metrics.csv))
ls -la $OUT
