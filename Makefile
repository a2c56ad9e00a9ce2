# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= demo_data
RUN ?= runs/demo

.PHONY: demo test venv venv-dev clean

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .   # `python -m entrep.*` from any folder
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# data -> k-fold training (real `accelerate launch`) -> inference -> submission -> local score
demo: venv
	rm -rf $(DEMO_DATA)
	$(PY) -m entrep.demo $(DEMO_DATA)
	$(PY) -m entrep.data check $(DEMO_DATA) --test $(DEMO_DATA)/test
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train.py --config configs/demo.yaml --data $(DEMO_DATA) --name demo
	$(PY) infer.py --run $(RUN) --data $(DEMO_DATA)/test
	$(PY) submit.py --run $(RUN)
	$(PY) -m entrep.score --track cls --submission $(RUN)/submission/cls.json --truth $(DEMO_DATA)/truth/track1_cls.json
	$(PY) -m entrep.score --track i2i --submission $(RUN)/submission/i2i.json --truth $(DEMO_DATA)/truth/track2_i2i.json
	$(PY) -m entrep.score --track t2i --submission $(RUN)/submission/t2i.json --truth $(DEMO_DATA)/truth/track3_t2i.json

test: venv-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_DATA) runs .pytest_cache
