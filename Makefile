# One-command setup: `make test` and `make demo` create .venv on first use (idempotent).
# TORCH is what pip installs for torch when the venv has none: the CPU build 2.13.0 by
# default. GPU users: create the venv with their CUDA torch first, or
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cu126" test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quests-torch-installed

.PHONY: setup test test-fast test-ts06-mace test-ts06-nequip demo lint bench bench-reference \
	gpu-check dist docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the quick loop: everything but the `slow` tests (subprocesses, torchrun, notebooks, > ~20 s;
# listed in tests/conftest.py); `make test` runs them all
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# torch-sim 0.6 (Python 3.12) beside the 0.3 of .venv (Python 3.11): one environment each for
# MACE and NequIP (e3nn 0.4.4 vs >= 0.6), pinned in .ci/envs/*.txt, created by .ci/mlip-env
# (cached in ~/.cache/quests-torch/envs, keyed by the lock file; this clone's code installed
# editable in .venv-ts06-*). The MACE one also runs the Fig. 3c benchmark on the fixture.
test-ts06-mace:
	.ci/mlip-env ts06-mace > /dev/null
	.venv-ts06-mace/bin/python -m pytest -q -p no:cacheprovider tests/test_torch_sim.py tests/test_mace.py
	mkdir -p bench-results
	.venv-ts06-mace/bin/python benchmarks/mace_error_vs_dh.py \
		--out bench-results/mace_error_vs_dh_ts06.json > /dev/null
	@echo "Fig. 3c with torch-sim 0.6: bench-results/mace_error_vs_dh_ts06.json"

test-ts06-nequip:
	.ci/mlip-env ts06-nequip > /dev/null
	.venv-ts06-nequip/bin/python -m pytest -q -p no:cacheprovider tests/test_nequip.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check quests_torch tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/quests-torch demo

# upstream `quests` for the side-by-side benchmarks
bench-reference: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,reference]'

bench: bench-reference
	mkdir -p bench-results
	$(PY) benchmarks/bench_descriptors.py --out bench-results/descriptors.jsonl
	$(PY) benchmarks/bench_kde.py --out bench-results/kde.jsonl
	$(PY) benchmarks/bench_screen.py --out bench-results/screen.jsonl
	$(PY) benchmarks/bench_compress.py --out bench-results/compress.jsonl
	$(PY) benchmarks/bench_uncertainty.py --out bench-results/uncertainty.jsonl
	$(PY) benchmarks/bench_generation.py --out bench-results/generation.jsonl
	$(PY) benchmarks/bench_distributed.py --out bench-results/distributed.jsonl

# an sdist and a wheel in dist/, checked by twine (CI runs it after the tests)
dist: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check build twine
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

# the documentation site in site/ (open site/index.html): user's guide, API and CLI
# reference, the notebooks executed (a few minutes; QUESTS_DOCS_EXECUTE=0 skips running them)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# the cached environments of test-ts06-* stay (rm -rf ~/.cache/quests-torch/envs)
clean:
	rm -rf $(VENV) .venv-ts06-mace .venv-ts06-nequip .pytest_cache .ruff_cache *.egg-info dist site

# on a machine with CUDA: correctness on the GPU, the CUDA tests and paper-scale timings (JSON)
gpu-check: $(STAMP)
	mkdir -p bench-results
	$(PY) benchmarks/gpu_check.py --out bench-results/gpu_check.json
