# The README's commands. Each sets up .venv itself from the pinned requirements.lock;
# a repeat run reinstalls nothing unless pyproject.toml or requirements.lock changed.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench report-screenshot clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/restyle make-tiny-models .cache/models
	$(VENV)/bin/restyle make-demo-data .cache/demo
	$(VENV)/bin/restyle run configs/demo.yaml

# Debian's chromium renders report.html in one test; without it (no root, no apt) that test skips.
# Azurite (npm, under .cache) serves the Azure Blob API to the az:// test; without node it skips.
test: $(STAMP)
	@command -v chromium >/dev/null || apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1) \
		|| echo "chromium not installed: the report rendering test will skip"
	@test -x .cache/azurite/node_modules/.bin/azurite-blob \
		|| npm install --silent --prefix .cache/azurite azurite@3.37.0 >/dev/null 2>&1 \
		|| echo "azurite not installed: the Azure store test will skip"
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check jobs operators tests bench

bench: $(STAMP)
	$(VENV)/bin/python bench/img2img_throughput.py

# docs/report.png, the README's picture of report.html: the demo job (with an SSIM threshold, so the
# fidelity chart has one to draw) into its own sink, shot by headless chromium.
REPORT_DEMO := outputs/report-demo
CHROMIUM ?= chromium

report-screenshot: $(STAMP)
	$(VENV)/bin/restyle make-tiny-models .cache/models
	$(VENV)/bin/restyle make-demo-data .cache/demo
	$(VENV)/bin/restyle run -q configs/demo.yaml --set sink.uri=$(REPORT_DEMO) --set fidelity.min_ssim=0.05
	mkdir -p docs
	$(CHROMIUM) --headless --disable-gpu --no-sandbox --hide-scrollbars --user-data-dir=$(CURDIR)/.cache/chromium \
		--window-size=1280,1600 --screenshot=$(CURDIR)/docs/report.png file://$(CURDIR)/$(REPORT_DEMO)/report.html

clean:
	rm -rf $(VENV) .cache outputs
