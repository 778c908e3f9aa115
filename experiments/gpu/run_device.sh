#!/usr/bin/env bash
# The first call of a GPU session (device tool, one H200): the GPU check `python -m lnfree.bench.gpu` -> gpu.json.
# (On 2026-11-28 this script also pretrained the width-only family; that is done and recorded in
# experiments/builtin_family/.) The second call, when device time is left: run_depth_grid.sh.
# Everything offline; packages missing on the device image travel as wheels in .whl/ (see experiments/gpu/README.md).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && cp -r .whl/antlr4 /tmp/site/ && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L; nproc
python3 -c "import torch, lightning, transformers, hydra, datasets; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# the GPU check first (bf16-mixed, FSDP2 on one device, removal on/off, save + resume, tokens/s, MFU, folded
# inference): its parts run in their own processes within a 450 s budget and gpu.json is rewritten after each,
# so whatever a cut-short session ran comes back. Then, if the session has time left, run_depth_grid.sh.
t1=$(date +%s)
timeout ${BENCH_TIMEOUT:-480} python3 -m lnfree.bench.gpu --out $OUT/gpu.json --tmp /tmp/bench 2>&1 | grep -v "it/s\]" | tail -n 40
echo "bench: $(( $(date +%s) - t1 )) s"
ls -la $OUT
