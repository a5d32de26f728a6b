# The two commands of the README: `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
DEMO_ROWS ?= 2000
FT_DIR ?= runs/demo_finetune

.PHONY: demo demo-finetune test install clean-demo

install: $(STAMP)

$(STAMP): requirements/base.txt requirements/dev.txt requirements/lock.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt -c requirements/lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# DeepSpeed JIT-compiles its CPU shared-memory collective op the first time a process group starts; build it
	# once here so tests and the demo never compile it (or race several compiles) themselves
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# two pytest-xdist workers, one test file per worker at a time (--dist loadfile keeps a file's module fixtures in one
# worker); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "not slurm and not slow" tests

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) DEMO_ROWS=$(DEMO_ROWS) VENV=$(VENV) bash scripts/demo.sh

# finetunes the `make demo` checkpoint (running `make demo` first when there is none): caption stage 1 -> stage 2
# and VQA, with a before/after table of the held-out metrics
demo-finetune: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) FT_DIR=$(FT_DIR) DEMO_ROWS=$(DEMO_ROWS) VENV=$(VENV) bash scripts/demo_finetune.sh

clean-demo:
	rm -rf $(DEMO_DIR)
