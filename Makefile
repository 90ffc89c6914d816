# `make run` runs the default study, `make test` the test suite. Both create .venv/ and install
# everything on first use (torch first, pinned to its CPU build, then the rest).
PYTHON_SYSTEM ?= python3
# The index torch comes from: PyPI's CPU build by default; for a GPU, PyTorch's CUDA index, e.g.
# `make clean-venv && make run TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: run test quick clean-venv bench-peers bench-parity check-export screenshots

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@echo "compiling umap-learn's numba functions into their on-disk cache (about 20 s, once per install)"
	$(PY) -c "import numpy as np; from experiments.eval.embedding import decoder_embedding; \
	          decoder_embedding(np.random.default_rng(0).standard_normal((64, 8)), 0)"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

run: $(STAMP)
	$(PY) run_experiments.py $(ARGS)

quick: $(STAMP)
	$(PY) run_experiments.py --quick $(ARGS)

# Two pytest-xdist workers, one per core (tests/conftest.py: the subject model is trained once).
test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# `make bench-peers`: our training step against SAELens and sparsify (benchmarks/bench_peers.py).
# Its own venv, .venv-peers/: sae-lens needs transformer-lens < 4, requirements.txt pins 4.x.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed-$(shell cksum benchmarks/requirements-peers.txt | cut -d' ' -f1)

$(PEERS_STAMP): benchmarks/requirements-peers.txt
	test -x $(PEERS_PY) || $(PYTHON_SYSTEM) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PEERS_PY) -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements-peers.txt
	rm -f $(PEERS_VENV)/.installed-* && touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/bench_peers.py $(ARGS)

# `make bench-parity`: each architecture against its reference implementation on the synthetic toys
# (benchmarks/bench_parity.py), in the same venv as bench-peers.
bench-parity: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/bench_parity.py $(ARGS)

# `make check-export`: every arm of the default study exported for SAELens, loaded back with SAELens and
# compared with ours on encode and decode (benchmarks/check_export.py), in the same venv as bench-peers.
check-export: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/check_export.py --study-dir checkpoints/default $(ARGS)

# `make screenshots`: the explorer's pages (docs/explorer/*.png) from the default study, with headless
# Chromium (Debian: apt-get install chromium); benchmarks/screenshots.py.
screenshots: $(STAMP)
	$(PY) benchmarks/screenshots.py --study-dir checkpoints/default $(ARGS)
