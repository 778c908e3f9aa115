"""A try at a control with confidence (entropy) neurons: width 64 well above the effective vocabulary (16 task
tokens, 13 of them ordinary: a 50-dim null space of the task's unembedding), one seed, 400 pretraining steps.

    python -m lnfree.pretrain model=synth_w64_1k model.replicate=0 model.pretrain_steps=400 \
        model.name=synth_w64_v16 model.source=builtin:synth_w64_v16 data=synthetic data.synthetic.vocab=16
    python experiments/interp/entropy_try.py        -> experiments/interp/entropy_try.json
"""

import json
from pathlib import Path

import torch

from lnfree.analysis.interp.cli import synthetic_task
from lnfree.analysis.interp.controls import neurons
from lnfree.data.synthetic import VAL_STREAM, BigramBackcopy
from lnfree.io import load

model, tok = load("builtin:synth_w64_v16")
settings, block = synthetic_task()
task = BigramBackcopy(**{**settings, "vocab": 16})
val = torch.tensor([task.block(VAL_STREAM, i, block, tok.eos_token_id) for i in range(32)])
res = neurons({"original": model.eval()}, val, torch.arange(task.low, task.low + task.vocab), k=16)
out = Path(__file__).with_name("entropy_try.json")
out.write_text(json.dumps({"model": "builtin:synth_w64_v16", "task_vocab": 16, "pretrain_steps": 400, **res}, indent=1))
top = res["top"]["original"]
print(f"top entropy neuron {res['top_neuron']}: median |dH| {top['median_abs_te_entropy']:.4f}, null-space fraction "
      f"{top['null_space_fraction']:.3f}, LN-mediated {100 * top['ln_mediated_fraction']:.0f}%")
for c in sorted(res["candidates"], key=lambda c: -c["median_abs_te_entropy"])[:8]:
    print(c["neuron"], round(c["w_out_norm"], 2), round(c["null_space_fraction"], 3),
          round(c["median_abs_te_entropy"], 4), round(c["ln_mediated_fraction"], 2))
