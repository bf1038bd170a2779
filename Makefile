# Developer shortcuts; the README's two commands are the reference.
PY ?= .venv/bin/python

.PHONY: venv test lint typecheck bench
venv:
	python3 -m venv .venv && .venv/bin/pip install -c constraints-cpu.txt -e '.[test,plot]'
test:
	$(PY) -m pytest
lint:
	$(PY) -m ruff check basins cli tests scripts
typecheck:
	$(PY) -m mypy basins cli
bench:
	$(PY) scripts/bench_hvp.py
	$(PY) scripts/bench_hessian.py
	$(PY) scripts/bench_nullity.py
	$(PY) scripts/bench_volume.py
