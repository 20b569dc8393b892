# mk/fuzz.mk: fuzz targets (fuzz/, libFuzzer through libfuzzer-sys).
#
# Included by the top Makefile (`-include mk/*.mk`); also runs on its own:
# `make -f mk/fuzz.mk test-fuzz`. Paths are relative to the repository root.
#
#   make test-fuzz           build every target, run each FUZZ_SECONDS (20)
#                            from its checked-in corpus, FUZZ_JOBS (nproc)
#                            at a time; a crash fails
#   make fuzz-build          build the instrumented targets only
#   make fuzz-run FUZZ_TARGET=http FUZZ_SECONDS=600
#                            one target, longer (docs/fuzzing.md)
#   make lint-fuzz           rustfmt + clippy -D warnings on fuzz/
#
# Stable Rust only: the targets are built with the coverage flags
# cargo-fuzz passes (stable codegen flags), without a sanitizer, for the
# host triple so that build scripts and proc macros stay uninstrumented.
# fuzz/ is its own workspace (docs/fuzzing.md).

SHELL := /bin/bash
CARGO ?= cargo

FUZZ_TARGETS  ?= convert config sse http
FUZZ_SECONDS  ?= 20
FUZZ_TARGET   ?= convert
# Extra libFuzzer flags, e.g. FUZZ_FLAGS='-jobs=2 -workers=2'.
FUZZ_FLAGS    ?=
FUZZ_TRIPLE   := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
FUZZ_DIR      := fuzz
FUZZ_OUT      := $(FUZZ_DIR)/target
FUZZ_BIN_DIR  := $(FUZZ_OUT)/$(FUZZ_TRIPLE)/release
# Inputs found in a run go here (ignored), never into the checked-in corpus.
FUZZ_WORK     := $(FUZZ_OUT)/corpus
FUZZ_ARTIFACTS := $(FUZZ_OUT)/artifacts
FUZZ_RUSTFLAGS := -Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cforce-frame-pointers
# -timeout: one input running this long is a hang (a finding);
# -rss_limit_mb: the whole process past this is a finding.
FUZZ_LIBFUZZER := -timeout=60 -rss_limit_mb=2048 -print_final_stats=0

TEST_TARGETS += test-fuzz
LINT_TARGETS += lint-fuzz

.PHONY: fuzz-build test-fuzz fuzz-run lint-fuzz clean-fuzz

# libfuzzer-sys compiles libFuzzer (C++) from source.
fuzz-build:
	@test -n "$(FUZZ_TRIPLE)" || { echo "fuzz: rustc not found" >&2; exit 1; }
	@scripts/apt-ensure g++
	RUSTFLAGS='$(FUZZ_RUSTFLAGS)' $(CARGO) build --locked --release \
	  --manifest-path $(FUZZ_DIR)/Cargo.toml --target $(FUZZ_TRIPLE) --bins

# Each target: its corpus, then FUZZ_SECONDS of search, FUZZ_JOBS targets
# at a time (one core each). A crash, a failed assertion, a hang or a leak
# ends the run with the input saved under $(FUZZ_ARTIFACTS)/<target>/; its
# path is printed. The last line is the tally CI reads.
FUZZ_JOBS     ?= $(shell nproc 2>/dev/null || echo 1)

test-fuzz: fuzz-build
	@rm -f $(addprefix $(FUZZ_OUT)/,$(addsuffix .passed,$(FUZZ_TARGETS)))
	@$(MAKE) -f $(firstword $(MAKEFILE_LIST)) --no-print-directory -k -j$(FUZZ_JOBS) --output-sync=target \
	  $(addprefix fuzz-one-,$(FUZZ_TARGETS)) || true
	@passed=0; failed=0; \
	for t in $(FUZZ_TARGETS); do \
	  if [ -f $(FUZZ_OUT)/$$t.passed ]; then passed=$$((passed + 1)); else failed=$$((failed + 1)); fi; \
	done; \
	echo "fuzz: $$passed passed, $$failed failed"; \
	test $$failed -eq 0

# One target of test-fuzz; $(FUZZ_OUT)/<target>.passed marks a clean run.
fuzz-one-%:
	@t=$*; mkdir -p $(FUZZ_WORK)/$$t $(FUZZ_ARTIFACTS)/$$t; \
	log=$(FUZZ_OUT)/$$t.log; start=$$(date +%s); \
	if $(FUZZ_BIN_DIR)/$$t $(FUZZ_WORK)/$$t $(FUZZ_DIR)/corpus/$$t \
	     -max_total_time=$(FUZZ_SECONDS) $(FUZZ_LIBFUZZER) \
	     -artifact_prefix=$(FUZZ_ARTIFACTS)/$$t/ $(FUZZ_FLAGS) > $$log 2>&1; then \
	  runs=$$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' $$log | tail -1); \
	  echo "fuzz $$t: ok, $${runs:-?} inputs in $$(( $$(date +%s) - start ))s"; \
	  touch $(FUZZ_OUT)/$$t.passed; \
	else \
	  echo "fuzz $$t: FAILED (log: $$log)"; \
	  grep -E -A12 "panicked at|ERROR: libFuzzer" $$log | head -40; \
	  for a in $$(sed -n 's/.*Test unit written to \(.*\)$$/\1/p' $$log); do \
	    echo "fuzz $$t: reproducer: $$a"; \
	    echo "  rerun: $(FUZZ_BIN_DIR)/$$t $$a"; \
	  done; \
	  exit 1; \
	fi

# One target for longer; stop with Ctrl-C (the corpus found so far stays
# in $(FUZZ_WORK)/<target>).
fuzz-run: fuzz-build
	mkdir -p $(FUZZ_WORK)/$(FUZZ_TARGET) $(FUZZ_ARTIFACTS)/$(FUZZ_TARGET)
	$(FUZZ_BIN_DIR)/$(FUZZ_TARGET) $(FUZZ_WORK)/$(FUZZ_TARGET) $(FUZZ_DIR)/corpus/$(FUZZ_TARGET) \
	  -max_total_time=$(FUZZ_SECONDS) $(FUZZ_LIBFUZZER) \
	  -artifact_prefix=$(FUZZ_ARTIFACTS)/$(FUZZ_TARGET)/ $(FUZZ_FLAGS)

# With fuzz-build's flags, profile and target: the build scripts and proc
# macros it compiles (SQLite, LuaJIT, libFuzzer, ring) serve the build too.
lint-fuzz:
	$(CARGO) fmt --manifest-path $(FUZZ_DIR)/Cargo.toml -- --check
	RUSTFLAGS='$(FUZZ_RUSTFLAGS)' $(CARGO) clippy --locked --release \
	  --manifest-path $(FUZZ_DIR)/Cargo.toml --target $(FUZZ_TRIPLE) --all-targets -- -D warnings

clean-fuzz:
	$(CARGO) clean --manifest-path $(FUZZ_DIR)/Cargo.toml
