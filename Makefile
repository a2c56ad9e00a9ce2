# On a fresh machine: `make demo`, `make test-fast` (minutes) and `make test` (everything; CI runs it through
# .ci/run). Each creates .venv when it is missing. docs/testing.md says what each tier covers and costs.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= demo_data
# The pinned versions (constraints.txt: what docs/recipe.md was measured with, and CI's); CONSTRAINTS=
# installs requirements.txt's lower bounds as pip resolves them today.
CONSTRAINTS ?= constraints.txt
# TORCH_INDEX=https://download.pytorch.org/whl/cpu on a machine without a GPU: torch's CPU wheels
# (a few hundred MB instead of about 3 GB of CUDA libraries); a GPU box leaves it empty.
TORCH_INDEX ?=
PIP_INSTALL := $(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: demo test test-fast venv venv-dev lock clean

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

# pip's own progress shows: the first install downloads several GB and takes minutes
$(VENV)/.installed: requirements.txt $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PIP_INSTALL) --progress-bar on -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .   # `python -m entrep.*` from any folder
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP_INSTALL) --progress-bar on -r requirements-dev.txt
	touch $@

# constraints.txt again from a fresh venv of today's resolution (after a deliberate upgrade; re-measure
# docs/recipe.md's tables with it)
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -r requirements-dev.txt
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable | sed 's/ @ .*//'; } \
		> constraints.txt.tmp && mv constraints.txt.tmp constraints.txt && rm -rf .lock-venv

# data -> k-fold training of two runs (real `accelerate launch`, another seed for the second) -> their
# blend, out of fold -> inference -> submission -> local score, for each run and the blend -> the runs table.
# DEMO_GEN / DEMO_TRAIN shrink it for the test that runs this target (tests/test_readme.py).
DEMO_GEN ?=
DEMO_TRAIN ?=
RUNS ?= runs
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
demo: venv
	rm -rf $(DEMO_DATA)
	$(PY) -m entrep.demo $(DEMO_DATA) $(DEMO_GEN)
	$(PY) -m entrep.data check $(DEMO_DATA) --test $(DEMO_DATA)/test
	$(ACCELERATE) train.py --config configs/demo.yaml --data $(DEMO_DATA) --name demo output_dir=$(RUNS) $(DEMO_TRAIN)
	$(ACCELERATE) train.py --config configs/demo.yaml --data $(DEMO_DATA) --name demo_seed1 output_dir=$(RUNS) \
		train.seed=1 $(DEMO_TRAIN)
	$(PY) -m entrep.blend --runs $(RUNS)/demo $(RUNS)/demo_seed1 --name demo_blend
	for run in demo demo_seed1 demo_blend; do \
		$(PY) infer.py --run $(RUNS)/$$run --data $(DEMO_DATA)/test && \
		$(PY) submit.py --run $(RUNS)/$$run && \
		for t in cls:track1_cls i2i:track2_i2i t2i:track3_t2i t2i:any_carrier/track3_t2i; do \
			$(PY) -m entrep.score --track $${t%%:*} --submission $(RUNS)/$$run/submission/$${t%%:*}.json \
				--truth $(DEMO_DATA)/truth/$${t#*:}.json || exit 1; \
		done || exit 1; \
	done
	$(PY) -m entrep.runs $(RUNS)
	@echo "each run's report.html: $(RUNS)/demo/report.html, $(RUNS)/demo_seed1/report.html, $(RUNS)/demo_blend/report.html"

# Tests spread over 2 worker processes (pytest-xdist). --dist loadgroup keeps the tests marked
# xdist_group("ddp") (real 2-process launches) on one worker, so no two of them share the cores at once.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup
test: venv-dev
	$(PYTEST)

test-fast: venv-dev
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(DEMO_DATA) runs .pytest_cache
