# Two commands work on a fresh machine:  make demo  (offline demo)  and  make test  (the test suite).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-audio demo-scst test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, by exact version: pip takes it from the local wheel cache where one exists.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/captioner demo --output-dir demo_out
	$(VENV)/bin/captioner eval --model demo_out/run/best --data demo_out/data --split test \
	    --strategy beam --num-beams 3 --max-new-tokens 20 --output-dir demo_out/eval

# The image + sound variant: captions that need both inputs, scored from both, image only and audio only.
demo-audio: $(STAMP)
	$(VENV)/bin/captioner demo --audio --output-dir demo_audio_out

# The demo's captioner continued with SCST vs with as many more cross-entropy steps, scored side by side.
demo-scst: $(STAMP)
	$(VENV)/bin/captioner demo --scst --output-dir demo_scst_out

# tests/test_serve_browser.py needs Chromium and its driver (Debian: chromium chromium-driver; .ci/run installs them)
test: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    echo "note: chromium/chromedriver missing: the browser test will fail (apt-get install chromium chromium-driver)"
	$(PY) -m pytest -q

clean:
	rm -rf demo_out demo_audio_out demo_scst_out runs .pytest_cache
