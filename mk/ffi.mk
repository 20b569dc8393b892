# mk/ffi.mk: libllmproxy (C ABI; LuaJIT module), its header, its hosts.
#
# Included by the top Makefile (`-include mk/*.mk`); also runs on its own:
# `make -f mk/ffi.mk test-ffi`. Paths are relative to the repository root.
#
#   make ffi                 build the C ABI library with its own LuaJIT,
#                            ffi/target/capi/release/libllmproxy.{so,a}, and
#                            the Lua module on the host's LuaJIT,
#                            ffi/target/release/libllmproxy.so (ADR 073)
#   make ffi-pkgconfig       that, and ffi/target/pkgconfig/llmproxy.pc for it
#   make ffi-header          regenerate include/llmproxy.h (cbindgen, pinned)
#   make ffi-header-check    fail when include/llmproxy.h is out of date
#   make lint-ffi            rustfmt + clippy -D warnings on ffi/
#   make test-ffi            header check + C, Go and LuaJIT hosts (+ valgrind)
#   make bench-ffi           per-call cost: Rust in-process, C ABI, Lua module
#                            -> docs/benchmarks.md (ffi-bench section)
#   make install             C library, header, llmproxy.pc, Lua module
#                            (PREFIX=/usr/local, DESTDIR= respected)
#
# ffi/ is a workspace of its own (docs/adr/001), built twice: in mlua
# `module` mode (the Lua module, `require "llmproxy"`, on the host's LuaJIT:
# what nginx loads) and in `vendored` mode (the C ABI alone, with a LuaJIT
# of its own that compiles scripts: what C, Go and LuaJIT FFI hosts link).

SHELL := /bin/bash
CARGO ?= cargo
CC ?= cc

FFI_TARGET    := ffi/target
FFI_LIB_DIR   := $(FFI_TARGET)/release
FFI_SO        := $(FFI_LIB_DIR)/libllmproxy.so
FFI_CARGO     := $(CARGO) --locked
FFI_MANIFEST  := --manifest-path ffi/Cargo.toml --target-dir $(FFI_TARGET)
# The shipped library allocates through mimalloc (docs/adr/035); valgrind
# runs it with LLMPROXY_ALLOCATOR=system, where every Rust allocation is
# malloc's (docs/adr/061).
FFI_FEATURES  := --features mimalloc
# The C ABI library (docs/adr/073): its own LuaJIT, built from source with
# LUAJIT_ENABLE_CHECKHOOK (.cargo/config.toml) and linked in, hidden.
CAPI_TARGET   := $(FFI_TARGET)/capi
CAPI_LIB_DIR  := $(CAPI_TARGET)/release
CAPI_SO       := $(CAPI_LIB_DIR)/libllmproxy.so
CAPI_A        := $(CAPI_LIB_DIR)/libllmproxy.a
CAPI_MANIFEST := --manifest-path ffi/Cargo.toml --target-dir $(CAPI_TARGET)
CAPI_FEATURES := --no-default-features --features vendored,mimalloc
FFI_VERSION    = $(shell sed -n 's/^version = "\(.*\)"/\1/p' ffi/Cargo.toml | head -1)
FFI_DEBS      := luajit2 libluajit2-5.1-dev libjansson-dev lua-cjson golang-go pkg-config valgrind

# cbindgen, pinned, installed on first use into an ignored project-local root
# (a debug build: it compiles in half the time and reads this crate in 0.2 s).
CBINDGEN_VERSION := 0.29.4
FFI_TOOLS     := $(FFI_TARGET)/tools
CBINDGEN      := $(FFI_TOOLS)/bin/cbindgen

# Host programs and the uninstalled pkg-config file they build against.
FFI_OUT       := $(FFI_TARGET)/hosts
FFI_PC_DIR    := $(FFI_TARGET)/pkgconfig
FFI_PC        := $(FFI_PC_DIR)/llmproxy.pc
FFI_PKG       := PKG_CONFIG_PATH=$(CURDIR)/$(FFI_PC_DIR)$${PKG_CONFIG_PATH:+:$$PKG_CONFIG_PATH}
FFI_CFLAGS    := -std=c11 -Wall -Wextra -Werror -O2 -g -pthread
FFI_C_COMMON  := examples/c/casefile.c examples/c/casefile.h include/llmproxy.h
# valgrind sees the library's Rust allocations only when they go to malloc
# (LLMPROXY_ALLOCATOR=system, docs/adr/061); set per command, so the hosts'
# other runs keep the shipped mimalloc path.
VALGRIND_RUN  := LLMPROXY_ALLOCATOR=system valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible
VALGRIND      := $(VALGRIND_RUN) -q

# Go: the build cache and GOPATH live under ffi/target (ignored), no network.
FFI_GO_ENV    := GOCACHE=$(CURDIR)/$(FFI_TARGET)/go/cache GOPATH=$(CURDIR)/$(FFI_TARGET)/go/path \
                 GOFLAGS= GOPROXY=off GO111MODULE=on CGO_ENABLED=1 $(FFI_PKG)

PREFIX        ?= /usr/local
DESTDIR       ?=
LIBDIR        ?= $(PREFIX)/lib
INCLUDEDIR    ?= $(PREFIX)/include
LUA_CMODDIR   ?= $(LIBDIR)/lua/5.1
LDCONFIG      ?= ldconfig

TEST_TARGETS  += test-ffi
LINT_TARGETS  += lint-ffi
LUA_SOURCES   += examples/lua/*.lua bench/ffi/*.lua

.PHONY: ffi ffi-pkgconfig ffi-deps ffi-tools ffi-header ffi-header-check lint-ffi test-ffi test-ffi-unit test-ffi-c test-ffi-c-valgrind \
        test-ffi-go test-ffi-lua test-ffi-install bench-ffi install install-ffi

ffi-deps:
	@scripts/apt-ensure $(FFI_DEBS)

ffi: ffi-deps
	$(FFI_CARGO) build --release $(FFI_MANIFEST) $(FFI_FEATURES)
	$(FFI_CARGO) build --release $(CAPI_MANIFEST) $(CAPI_FEATURES)

# The library and an uninstalled llmproxy.pc for it, for programs built
# against the checkout: PKG_CONFIG_PATH=$PWD/ffi/target/pkgconfig.
ffi-pkgconfig: ffi $(FFI_PC)
	@echo "PKG_CONFIG_PATH=$(CURDIR)/$(FFI_PC_DIR)"

$(FFI_PC): ffi/llmproxy.pc.in ffi/Cargo.toml
	@mkdir -p $(FFI_PC_DIR)
	sed -e 's|@PREFIX@|$(CURDIR)|' -e 's|@LIBDIR@|$(CURDIR)/$(CAPI_LIB_DIR)|' \
	    -e 's|@INCLUDEDIR@|$(CURDIR)/include|' -e 's|@VERSION@|$(FFI_VERSION)|' \
	    -e 's|@RPATH@|-Wl,-rpath,$${libdir} |' $< > $@

# ---- header -------------------------------------------------------------

ffi-tools:
	@if ! $(CBINDGEN) --version 2>/dev/null | grep -qx 'cbindgen $(CBINDGEN_VERSION)'; then \
	  echo "installing cbindgen $(CBINDGEN_VERSION) into $(FFI_TOOLS)"; \
	  $(CARGO) install cbindgen --version '=$(CBINDGEN_VERSION)' --locked --debug --root $(FFI_TOOLS); \
	fi

ffi-header: ffi-tools
	$(CBINDGEN) --config ffi/cbindgen.toml --crate llmproxy-ffi --output include/llmproxy.h ffi

ffi-header-check: ffi-tools
	@mkdir -p $(FFI_TARGET)
	$(CBINDGEN) --config ffi/cbindgen.toml --crate llmproxy-ffi --output $(FFI_TARGET)/llmproxy.h.fresh ffi
	@diff -u include/llmproxy.h $(FFI_TARGET)/llmproxy.h.fresh || { \
	  echo "include/llmproxy.h is out of date: run 'make ffi-header' and commit it" >&2; exit 1; }
	@echo '#include "llmproxy.h"' | $(CC) -x c -std=c99 -Wall -Wextra -Werror -pedantic -fsyntax-only -Iinclude -
	@echo '#include "llmproxy.h"' | $(CXX) -x c++ -Wall -Wextra -Werror -fsyntax-only -Iinclude -
	@echo "include/llmproxy.h is up to date and compiles as C99 and C++"

lint-ffi:
	$(CARGO) fmt --manifest-path ffi/Cargo.toml -- --check
	$(FFI_CARGO) clippy --release $(FFI_MANIFEST) $(FFI_FEATURES) --all-targets -- -D warnings
	$(FFI_CARGO) clippy --release $(CAPI_MANIFEST) $(CAPI_FEATURES) --all-targets -- -D warnings

# ---- hosts --------------------------------------------------------------

test-ffi: ffi-header-check test-ffi-unit test-ffi-c test-ffi-c-valgrind test-ffi-go test-ffi-lua test-ffi-install
	@echo "test-ffi: C, Go and LuaJIT hosts passed"

$(FFI_OUT)/%: examples/c/%.c $(FFI_C_COMMON) $(FFI_PC) $(CAPI_SO)
	@mkdir -p $(FFI_OUT)
	libs="$$($(FFI_PKG) pkg-config --libs llmproxy jansson)" && \
	  $(CC) $(FFI_CFLAGS) -Iinclude -o $@ $< examples/c/casefile.c $$libs

# The libraries are (re)built by cargo, which knows when they are stale.
$(FFI_SO) $(CAPI_SO): ffi
	@:

# The crate's own unit tests (pure Rust: no Lua state is opened).
test-ffi-unit: ffi-deps
	$(FFI_CARGO) test --release $(FFI_MANIFEST) $(FFI_FEATURES) --lib

test-ffi-c: ffi $(FFI_OUT)/conformance $(FFI_OUT)/badcalls $(FFI_OUT)/threads $(FFI_OUT)/handle
	$(FFI_OUT)/conformance conformance/cases
	$(FFI_OUT)/badcalls
	$(FFI_OUT)/handle
	$(FFI_OUT)/threads conformance/cases/020-seed-request-transform-model-map.json 16 2000

# valgrind runs scripts ~20x slower: stretch time limits, except where a
# timeout is the expected outcome (LLMP_TIMEOUT_SCALE, examples/c/conformance.c).
# valgrind runs one thread at a time; with its default (unfair) lock a
# script spinning in a loop kept the deadline timer's thread from running
# for tens of seconds, so each case that must time out took 15-100 s
# instead of a tenth of one (the suite 10 min instead of 15 s):
# --fair-sched=yes hands the threads turns. `threads` keeps the default,
# with its limit stretched too: its four callers take turns.
# LLMPROXY_ALLOCATOR=system sends the library's Rust allocations to malloc,
# where valgrind sees them; the heap summary of the `handle` run proves it
# (on mimalloc it counts a handful of mallocs, here thousands).
test-ffi-c-valgrind: test-ffi-c
	LLMP_TIMEOUT_SCALE=20 $(VALGRIND) --fair-sched=yes $(FFI_OUT)/conformance conformance/cases
	$(VALGRIND) $(FFI_OUT)/badcalls
	LLMP_TIMEOUT_SCALE=20 $(VALGRIND) $(FFI_OUT)/threads conformance/cases/001-seed-routing-viplevel-3.json 4 50
	$(VALGRIND_RUN) $(FFI_OUT)/handle 2> $(FFI_OUT)/handle.valgrind || { cat $(FFI_OUT)/handle.valgrind; exit 1; }
	@allocs=$$(sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' $(FFI_OUT)/handle.valgrind | tr -d ,); \
	  test "$${allocs:-0}" -gt 1000 || { echo "valgrind saw $${allocs:-no} mallocs: the library's allocations went elsewhere (LLMPROXY_ALLOCATOR=system)" >&2; exit 1; }; \
	  echo "valgrind: $$allocs mallocs checked in the handle run, no error, no leak"

test-ffi-go: ffi $(FFI_PC)
	cd examples/go && $(FFI_GO_ENV) go vet ./...
	cd examples/go && $(FFI_GO_ENV) go test -count=1 -race ./...

test-ffi-lua: ffi
	LLMP_CAPI_DIR=$(CAPI_LIB_DIR) luajit examples/lua/capi_host.lua
	LLMP_LIB_DIR=$(FFI_LIB_DIR) luajit examples/lua/conformance.lua conformance/cases/*.json
	LLMP_LIB_DIR=$(FFI_LIB_DIR) luajit examples/lua/api_test.lua
	@# The shipped build allocates through mimalloc unless LLMPROXY_ALLOCATOR=system (ADR 061).
	for a in mimalloc system; do \
	  LLMPROXY_ALLOCATOR=$$a LUA_CPATH='$(FFI_LIB_DIR)/lib?.so' luajit -e "assert(require('llmproxy').allocator == '$$a')" || exit 1; \
	done; echo "llmproxy.allocator follows LLMPROXY_ALLOCATOR"

# `make install` into a scratch PREFIX, then build and run hosts against it.
export FFI_LUA_SMOKE := local m = require "llmproxy"; \
  assert(m.new("scripts: {routing: {script: return nil}}")); print("installed Lua module: " .. m.version)
FFI_STAGE := $(CURDIR)/$(FFI_TARGET)/install-test
test-ffi-install: ffi
	rm -rf $(FFI_STAGE)
	$(MAKE) -f $(firstword $(MAKEFILE_LIST)) --no-print-directory install-ffi PREFIX=$(FFI_STAGE) LDCONFIG=true
	flags="$$(PKG_CONFIG_PATH=$(FFI_STAGE)/lib/pkgconfig pkg-config --cflags --libs llmproxy jansson)" && \
	  $(CC) $(FFI_CFLAGS) -Iexamples/c -o $(FFI_STAGE)/conformance examples/c/conformance.c \
	    examples/c/casefile.c $$flags
	@# No LD_LIBRARY_PATH: the installed llmproxy.pc's rpath finds the library.
	env -u LD_LIBRARY_PATH $(FFI_STAGE)/conformance conformance/cases > /dev/null && echo "installed library: conformance passed"
	LUA_CPATH='$(FFI_STAGE)/lib/lua/5.1/?.so' luajit -e "$$FFI_LUA_SMOKE"

# ---- install ------------------------------------------------------------

# Files are copied next to their destination and renamed over it: a running
# nginx that mapped the old library keeps a valid mapping (docs/architecture.md, "LuaJIT, as embedded here").
install: install-ffi

install-ffi: ffi
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LUA_CMODDIR)
	install -m 0755 $(CAPI_SO) $(DESTDIR)$(LIBDIR)/.libllmproxy.so.new
	mv -f $(DESTDIR)$(LIBDIR)/.libllmproxy.so.new $(DESTDIR)$(LIBDIR)/libllmproxy.so
	install -m 0644 $(CAPI_A) $(DESTDIR)$(LIBDIR)/libllmproxy.a
	install -m 0644 include/llmproxy.h $(DESTDIR)$(INCLUDEDIR)/llmproxy.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(FFI_VERSION)|' -e 's|@RPATH@|-Wl,-rpath,$${libdir} |' ffi/llmproxy.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/llmproxy.pc
	install -m 0755 $(FFI_SO) $(DESTDIR)$(LUA_CMODDIR)/.llmproxy.so.new
	mv -f $(DESTDIR)$(LUA_CMODDIR)/.llmproxy.so.new $(DESTDIR)$(LUA_CMODDIR)/llmproxy.so
	@# Programs linked through llmproxy.pc carry an rpath to LIBDIR; the
	@# loader cache serves the others (on Debian /usr/local/lib is in it).
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" -eq 0 ] && command -v $(LDCONFIG) >/dev/null; then $(LDCONFIG); fi

# ---- benchmarks ---------------------------------------------------------

# Rounds of the three hosts, interleaved so each C and Lua figure has an
# in-process figure from the same run; FFI_BENCH_DOC=- leaves docs alone.
FFI_BENCH_N      ?= 100000
FFI_BENCH_ROUNDS ?= 3
FFI_BENCH_DOC    ?= docs/benchmarks.md

bench-ffi: ffi $(FFI_PC)
	@mkdir -p $(FFI_OUT)
	libs="$$($(FFI_PKG) pkg-config --libs llmproxy)" && \
	  $(CC) -std=c11 -O2 -g -Wall -Wextra -Werror -Iinclude -o $(FFI_OUT)/bench_c bench/ffi/bench_c.c $$libs
	$(FFI_CARGO) build --release $(CAPI_MANIFEST) $(CAPI_FEATURES) --example bench-inproc
	@echo "bench-ffi on $$(nproc) cores, $(FFI_BENCH_N) calls each, routing script of case 001, ~10 KB body"
	python3 bench/ffi/report.py . $(FFI_BENCH_N) $(FFI_BENCH_ROUNDS) $(FFI_BENCH_DOC) \
	  -- $(CAPI_LIB_DIR)/examples/bench-inproc . $(FFI_BENCH_N) \
	  -- $(FFI_OUT)/bench_c . $(FFI_BENCH_N) \
	  -- env LLMP_LIB_DIR=$(FFI_LIB_DIR) luajit bench/ffi/bench_lua.lua . $(FFI_BENCH_N) \
	  -- env LLMP_LIB_DIR=$(CAPI_LIB_DIR) luajit bench/ffi/request_life.lua . $(FFI_BENCH_N)

# ---- housekeeping -------------------------------------------------------

.PHONY: clean-ffi
clean-ffi:
	$(CARGO) clean $(FFI_MANIFEST)
	rm -rf $(FFI_OUT) $(FFI_PC_DIR) $(FFI_TARGET)/go $(FFI_STAGE)
