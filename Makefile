# The README's commands. Each sets up .venv itself from the pinned requirements.lock;
# a repeat run reinstalls nothing unless pyproject.toml or requirements.lock changed.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/restyle make-tiny-models .cache/models
	$(VENV)/bin/restyle make-demo-data .cache/demo
	$(VENV)/bin/restyle run configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check jobs operators tests bench

bench: $(STAMP)
	$(VENV)/bin/python bench/img2img_throughput.py

clean:
	rm -rf $(VENV) .cache outputs
