#!/usr/bin/env bash
# The two fine-tunes of experiments/real_smollm2/, attempt 3 (stated 2026-12-07 22:20 UTC, before either ran; README.md
# there; attempts 1 and 2 are in attempt1_fast/ and attempt2_ramp/): LN-free and its vanilla control
# (schedule=none), seed 1, same data order, 400 steps of 4 x 256 tokens of the built-in corpus's training split,
# AdamW 2e-4 cosine to 2e-5 after 10 warm-up steps, bf16 autocast (this CPU has native AVX-512 bf16), one thread.
# LN-free attempt 3: no auxiliary loss (on this model it was 30-60x the CE before any removal), every sigma at its
# calibration on the first batch (momentum 1), each site ramped out over 16 steps, the pre-MLP norms every 6 steps
# (10, 16, ..., 184), all query/key paths at once (196), the value paths every 4 steps (206-322), the final norm at
# 334; the last ramp ends at step 350, 50 steps before the end.
# A finished run is skipped (skip_if_done); a killed one prints its resume command (ckpt_path=...), run it as printed.
#   RUNS=outputs/real_smollm2 bash experiments/real_smollm2/train.sh [lnfree] [vanilla]   (default: both, in turn)
set -u
RUNS=${RUNS:-outputs/real_smollm2}
PY=${PY:-python}
COMMON="model=smollm2_135m_q4 seed=1 trainer.max_steps=400 hardware.micro_batch_size=4 hardware.precision=bf16-mixed
  optim=default optim.lr=2e-4 optim.min_lr=2e-5 trainer.val_every=100 trainer.ckpt_every=50 data.val_blocks=32
  trainer.keep_at_end=last trainer.progress_bar=false skip_if_done=true"
LNFREE="schedule=fast_noaux schedule.momentum=1.0 schedule.ramp.steps=16 schedule.pre_mlp.start=10
  schedule.pre_mlp.gap=6 schedule.attn_qk.start=196 schedule.attn_qk.gap=0 schedule.attn_v.start=206
  schedule.attn_v.gap=4 schedule.final.start=334"
for arm in "${@:-lnfree vanilla}"; do
  for a in $arm; do
    if [ $a = lnfree ]; then sched=$LNFREE; else sched="schedule=none"; fi
    t0=$(date +%s)
    OMP_NUM_THREADS=1 $PY -m lnfree.train $COMMON $sched hydra.run.dir=$RUNS/${a}_s1 || echo "[train.sh] $a: rc=$?"
    echo "[train.sh] $a: $(( $(date +%s) - t0 )) s wall"
  done
done
