# LLMProxy — every build and test step in one place.
#
#   make test        everything CI runs (lint + all tests of every host)
#   make test-fuzz   each fuzz target for FUZZ_SECONDS (docs/fuzzing.md)
#   make serve       the standalone gateway on the built-in demo config
#   make bench-core  in-process hook benchmarks -> docs/benchmarks.md
#
# Debian packages are installed by scripts/apt-ensure when missing.

SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

# Host-specific targets (ffi, openresty, ...) add themselves to these.
TEST_TARGETS := test-rust
LINT_TARGETS := lint-rust lint-lua

.PHONY: all test lint lint-rust lint-lua test-rust build release serve bench-core check-toolchain clean

all: build

check-toolchain:
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "cargo not found: install the Rust toolchain (rustup, stable >= 1.88), then re-run make" >&2; exit 1; }

build: check-toolchain
	$(CARGO) build --workspace --all-targets

release: check-toolchain
	$(CARGO) build --release -p llmproxy-server

lint-rust: check-toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

lint-lua:
	@scripts/apt-ensure lua-check
	luacheck --no-color $(LUA_SOURCES)

LUA_SOURCES := core/src/sandbox/prelude.lua core/src/convert/lazy.lua

test-rust: check-toolchain
	$(CARGO) test --workspace
	# Again as nginx and C hosts run scripts (ADR 064): interpreted, with
	# the sandbox's own code compiled.
	LLMPROXY_SANDBOX_JIT=sandbox $(CARGO) test -p llmproxy-core --test sandbox_escapes \
	  --test compiled_field_reads --test conformance --test inline_budget

-include mk/*.mk

lint: $(LINT_TARGETS)

test: lint $(TEST_TARGETS)
	@echo "make test: all suites passed"

serve: release
	./target/release/llmproxy serve

# The 1 MB / 10 KB routing ratio is also taken from three rounds of the
# two rows alone, each in a process of its own: in the whole run they
# follow the 1 MB parse rows, and where those left the allocator's pages
# moves the pair by up to 25% (docs/benchmarks.md, 2026-12-07, 2026-12-08).
BENCH_ROUNDS_DIR := target/criterion-rounds
bench-core: check-toolchain
	rm -rf $(BENCH_ROUNDS_DIR)
	for r in 1 2 3; do \
	  $(CARGO) bench -p llmproxy-bench --bench hooks -- 'routing/sandboxed/' || exit 1; \
	  mkdir -p $(BENCH_ROUNDS_DIR)/$$r && cp -r target/criterion/routing $(BENCH_ROUNDS_DIR)/$$r/ || exit 1; \
	done
	$(CARGO) bench -p llmproxy-bench --bench hooks
	LLMPROXY_SANDBOX_JIT=sandbox $(CARGO) bench -p llmproxy-bench --bench hooks -- compute/sandboxed
	$(CARGO) run -q --release -p llmproxy-bench --bin bench-report -- target/criterion docs/benchmarks.md $(BENCH_ROUNDS_DIR)

clean:
	$(CARGO) clean
