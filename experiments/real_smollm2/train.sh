#!/usr/bin/env bash
# The two fine-tunes of experiments/real_smollm2/, attempt 2 (stated 2026-12-07 22:15 UTC, before either ran; README.md
# there; attempt 1, schedule=fast, is in attempt1_fast/): LN-free and its vanilla control (schedule=none), seed 1,
# same data order, 120 steps of 4 x 256 tokens of the built-in corpus's training split, AdamW 2e-4 cosine to 2e-5
# after 10 warm-up steps, bf16 autocast (this CPU has native AVX-512 bf16), one thread.
# LN-free attempt 2: every sigma stays at its calibration on the first batch (momentum 1: one overflowing step cannot
# contaminate the later sites), each site ramped out over 12 steps (soft removal), the pre-MLP norms at every other
# step (4, 6, ..., 62), all query/key paths at once (64), the value paths one per step (68-97), the final norm at 98,
# the last ramp ending at step 110.
# A finished run is skipped (skip_if_done); a killed one prints its resume command (ckpt_path=...), run it as printed.
#   RUNS=outputs/real_smollm2 bash experiments/real_smollm2/train.sh
set -u
RUNS=${RUNS:-outputs/real_smollm2}
PY=${PY:-python}
COMMON="model=smollm2_135m_q4 seed=1 trainer.max_steps=120 hardware.micro_batch_size=4 hardware.precision=bf16-mixed
  optim=default optim.lr=2e-4 optim.min_lr=2e-5 trainer.val_every=40 trainer.ckpt_every=20 data.val_blocks=32
  trainer.keep_at_end=last trainer.progress_bar=false skip_if_done=true"
LNFREE="schedule=fast schedule.momentum=1.0 schedule.ramp.steps=12 schedule.pre_mlp.start=4 schedule.pre_mlp.gap=2
  schedule.attn_qk.start=64 schedule.attn_qk.gap=0 schedule.attn_v.start=68 schedule.attn_v.gap=1 schedule.final.start=98"
for arm in lnfree vanilla; do
  if [ $arm = lnfree ]; then sched=$LNFREE; else sched="schedule=none"; fi
  t0=$(date +%s)
  OMP_NUM_THREADS=1 $PY -m lnfree.train $COMMON $sched hydra.run.dir=$RUNS/${arm}_s1 || echo "[train.sh] $arm: rc=$?"
  echo "[train.sh] $arm: $(( $(date +%s) - t0 )) s wall"
done
