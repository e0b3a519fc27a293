# The two commands of the README. Each sets itself up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXAMPLE := examples/mnist_cnn.onnx

.PHONY: demo test install bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c "import weasyprint" 2>/dev/null || { apt-get update -qq && apt-get install -y -qq libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0; }
	touch $(STAMP)

install: $(STAMP)

$(EXAMPLE): | $(STAMP)
	$(PY) -m examples.train_mnist

demo: $(STAMP) | $(EXAMPLE)
	$(VENV)/bin/auditor demo --out out/demo

# Test files run in parallel, one per worker at a time (module fixtures are built once).
TEST_WORKERS ?= 2

# One thread per process: the workers (and the auditor processes the tests start) already use the
# cores, and more threads than cores make the small tensor ops of the attacks several times slower.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) bench/throughput.py
