#!/usr/bin/env bash
# The one prepared GPU session (device tool, one H200): pretrain the built-in size family (two dropout recipes,
# every width in parallel on the one GPU), then the GPU check `python -m lnfree.bench.gpu`. (Run on 2026-11-28 with
# the recipe as an experiment preset, experiment=family_pretrain; it is now conf/pretrain.yaml itself.)
# Everything offline; packages missing on the device image travel as wheels in .whl/ (see experiments/gpu/README.md).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && cp -r .whl/antlr4 /tmp/site/ && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L; nproc
python3 -c "import torch, lightning, transformers, hydra, datasets; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
for p in 0.1 0.2; do mkdir -p /tmp/fam_$p; for d in 48 64 96 128 192 256; do
  timeout ${FAMILY_TIMEOUT:-300} python3 -m lnfree.pretrain model=builtin_w$d model.dropout=$p \
    hardware=gpu hardware.precision=32-true paths.cache_dir=/tmp/fam_$p hydra.run.dir=/tmp/fam_$p/runs/w$d \
    trainer.progress_bar=false > /tmp/fam_$p/w$d.log 2>&1 &
done; done
wait
echo "family pretraining: $(( $(date +%s) - t0 )) s"
for p in 0.1 0.2; do for d in 48 64 96 128 192 256; do tail -n 1 /tmp/fam_$p/w$d.log; done; done
# curves, infos and logs (small) in one archive; weights in six (each under 16 MiB)
(cd /tmp && tar czf $OUT/family_curves.tgz fam_*/w*.log fam_*/runs/*/csv fam_*/runs/*/summary.json fam_*/models/*/pretrain_info.json)
for p in 0.1 0.2; do
  (cd /tmp/fam_$p/models && tar cf $OUT/family_$p-small.tar w48 w64 w96 w128 && tar cf $OUT/family_$p-w192.tar w192 && tar cf $OUT/family_$p-w256.tar w256)
done
t1=$(date +%s)
timeout ${BENCH_TIMEOUT:-280} python3 -m lnfree.bench.gpu --out $OUT/gpu.json --tmp /tmp/bench 2>&1 | grep -v "it/s\]" | tail -n 40
echo "bench: $(( $(date +%s) - t1 )) s"
ls -la $OUT
