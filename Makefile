# One virtualenv, created and filled on first use by any target that needs it.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pinned to the CPU wheel on a fresh machine; see README "Install" for GPU machines.
TORCH ?= torch==2.13.0

.PHONY: install test check test-fast train sweep eval family scaling bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q '$(TORCH)' -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

check: install
	$(VENV)/bin/ruff check lnfree tests

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the main job on the built-in default; extra Hydra overrides: make train ARGS="schedule=none"
train: install
	$(PY) -m lnfree.train $(ARGS)

# LN-free vs vanilla control on the built-in default, one job (and W&B run) each
sweep: install
	$(PY) -m lnfree.train -m schedule=none,builtin $(ARGS)

# original vs vanilla control vs LN-free (vs all norms removed without fine-tuning) on the built-in default;
# trains what is missing first. Table and figures: experiments/builtin_eval/
RUNS ?= outputs/builtin
eval: install
	test -f $(RUNS)/vanilla/summary.json || $(PY) -m lnfree.train schedule=none hydra.run.dir=$(RUNS)/vanilla
	test -f $(RUNS)/lnfree/summary.json || $(PY) -m lnfree.train hydra.run.dir=$(RUNS)/lnfree
	test -d $(RUNS)/no_finetune/export || $(PY) -m lnfree.training.remove_now builtin:2x128 $(RUNS)/no_finetune
	$(PY) -m lnfree.eval $(ARGS)

# the built-in family, pretrained into ~/.cache/lnfree/models (skips those already there or shipped);
# loading never pretrains, so the targets that need the family depend on this one
FAMILY ?= w48 w64 w96 w128 w192 w256
family: install
	for m in $(FAMILY); do \
	  if $(PY) -c "import sys; from lnfree.io import builtin_dir; sys.exit(builtin_dir('$$m').exists())"; then \
	    $(PY) -m lnfree.pretrain experiment=family_pretrain model=builtin_$$m hydra.run.dir=outputs/pretrain/$$m overwrite=true || exit 1; \
	  fi; done

# data needed to remove LayerNorm vs model size on the built-in family (40 short runs), then the fit
scaling: family
	$(PY) -m lnfree.train -m experiment=data_scaling hydra.sweep.dir=multirun/data_scaling/latest $(ARGS)
	$(PY) -m lnfree.analysis.scaling multirun/data_scaling/latest

# cost of the removal machinery and speed of the LN-free model (not part of `make test`)
bench: install
	$(PY) -m lnfree.bench.cpu $(ARGS)

# on a machine with a GPU: bf16-mixed, FSDP (1 device), save/resume, tokens/s and MFU
bench-gpu: install
	$(PY) -m lnfree.bench.gpu $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .benchmarks
