# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install what they need on a fresh machine with nothing but Python 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.srigl-installed
DATA   := data

.PHONY: install data test test-matrix demo reproduce bench clean

# The pinned CPU torch wheel first: pyproject's torch range alone could resolve to a 5 GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from the Debian package dataset-fashion-mnist (no download at run time).
data: $(STAMP)
	$(PY) -m srigl data fetch fashion-mnist --data-dir $(DATA)

test: $(STAMP) data
	SRIGL_DATA_DIR=$(DATA) $(PY) -m pytest -n 2 -q

# The suite under Python 3.12 and 3.13 (pyenv builds, or pythonX.Y on PATH; a missing one is skipped with a
# printed line). Not in `make test`: PyPI has only the CUDA torch for them, a ~1.4 GB download and a 5.4 GB
# venv per Python, then a full suite; it writes results/support_matrix.md. Options: MATRIX_PYTHONS="3.12",
# MATRIX_TESTS="tests/kernels", MATRIX_KEEP=1 (keep .venv-matrix/pyX.Y).
test-matrix: data
	SRIGL_DATA_DIR=$(DATA) bash .ci/test_matrix.sh

demo: $(STAMP) data
	$(PY) -m srigl train --data fashion-mnist --data-dir $(DATA) --model mlp --method srigl \
		--sparsity 0.9 --epochs 3 --seed 0 --out runs/demo --plot

# The reproduction study: the Fashion-MNIST grid (102 runs, ~21 min on 2 idle cores) plus the ViT and
# small-delta studies (24 runs, most of them vit-tiny at ~4 min each); resumable.
reproduce: $(STAMP) data
	$(PY) benchmarks/reproduce.py --data-dir $(DATA) --out results/reproduction

# Every benchmark script in benchmarks/ but the long reproduce.py study and the GPU check (each prints side-by-side
# ratios and writes results/*.md); one alone: .venv/bin/python benchmarks/NAME.py
BENCHMARKS := $(sort $(filter-out benchmarks/reproduce.py benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)))

bench: $(STAMP) data
	@status=0; for script in $(BENCHMARKS); do \
		echo "== $$(basename $$script)"; $(PY) $$script || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) .venv-matrix runs build src/*.egg-info .pytest_cache
