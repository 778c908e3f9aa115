#!/usr/bin/env bash
# The two fine-tunes of experiments/real_smollm2/ (stated 2026-12-07 19:10 UTC, before either ran; README.md there):
# LN-free (schedule=fast: one site per step from step 10, all 91 gone by step 100) and its vanilla control
# (schedule=none), seed 1, same data order, 120 steps of 4 x 256 tokens of the built-in corpus's training split,
# AdamW 2e-4 cosine to 2e-5 after 10 warm-up steps, bf16 autocast (this CPU has native AVX-512 bf16), one thread.
# A finished run is skipped (skip_if_done); a killed one prints its resume command (ckpt_path=...), run it as printed.
#   RUNS=outputs/real_smollm2 bash experiments/real_smollm2/train.sh
set -u
RUNS=${RUNS:-outputs/real_smollm2}
PY=${PY:-python}
COMMON="model=smollm2_135m_q4 seed=1 trainer.max_steps=120 hardware.micro_batch_size=4 hardware.precision=bf16-mixed
  optim=default optim.lr=2e-4 optim.min_lr=2e-5 trainer.val_every=40 trainer.ckpt_every=40 data.val_blocks=32
  trainer.keep_at_end=last trainer.progress_bar=false skip_if_done=true"
for arm in lnfree:fast vanilla:none; do
  name=${arm%%:*}; sched=${arm#*:}
  t0=$(date +%s)
  OMP_NUM_THREADS=1 $PY -m lnfree.train $COMMON schedule=$sched hydra.run.dir=$RUNS/${name}_s1 || echo "[train.sh] $name: rc=$?"
  echo "[train.sh] $name: $(( $(date +%s) - t0 )) s wall"
done
