# mk/openresty.mk: the OpenResty host (openresty/, nginx-conf/, t/).
#
# Included by the top Makefile (`-include mk/*.mk`); also runs on its own:
# `make -f mk/openresty.mk test-openresty`. Paths are relative to the
# repository root.
#
#   make test-openresty      nginx tests: prove -r t/ (t/README.md)
#   make test-openai-client-nginx
#                            the official `openai` Python client against
#                            nginx + resty.llmproxy (t/openai_client_nginx.py)
#   make openresty-deps      the Debian packages they need
#   make nginx-up / nginx-down  the README's nginx example (nginx-conf/) on :8000
#                            with mock backends; nginx-down stops them
#   make install-openresty   resty/llmproxy*.lua into $(LUA_LDIR)
#   make bench-openresty     plain nginx proxy_pass vs nginx + resty.llmproxy
#                            (auth, rate_limit, routing, usage; 1 and 2
#                            workers) -> docs/benchmarks.md (openresty-bench)
#
# The tests start their own nginx per test file on free 127.0.0.1 ports
# under t/servroot-<pid>/; they never use a system nginx or port 80.

SHELL := /bin/bash
CARGO ?= cargo

OPENRESTY_DEBS := nginx libnginx-mod-http-lua lua-resty-core lua-cjson lua-nginx-redis redis-server libtest-base-perl lua-check curl
PROVE          ?= prove
PROVE_FLAGS    ?= -r

# The Lua module comes from mk/ffi.mk's `ffi` target (cargo knows when it
# is stale). On its own (`make -f mk/openresty.mk`) this file pulls
# mk/ffi.mk in; without mk/ffi.mk it builds the library itself.
ifndef FFI_SO
-include mk/ffi.mk
endif
ifdef FFI_SO
OPENRESTY_LIB_TARGET := ffi
OPENRESTY_LIB_DIR    := $(FFI_LIB_DIR)
else
OPENRESTY_LIB_TARGET := openresty-ffi
OPENRESTY_LIB_DIR    := ffi/target/release
.PHONY: openresty-ffi
openresty-ffi:
	@# luarocks passes CC, CFLAGS and friends: cargo would rebuild the C parts for them
	env -u CC -u CFLAGS -u LIBFLAG -u LDFLAGS $(CARGO) build --locked --release --manifest-path ffi/Cargo.toml --target-dir ffi/target --features mimalloc
endif

PREFIX   ?= /usr/local
DESTDIR  ?=
LUA_LDIR ?= $(PREFIX)/share/lua/5.1

TEST_TARGETS += test-openresty test-openai-client-nginx test-rock
LUA_SOURCES  += openresty/lib openresty/bench t/lib/*.lua

# The same venv and mock backend as mk/proxy.mk's test-openai-client (its
# rule makes the venv: mk/proxy.mk is read after this file, so the venv is
# made by a sub-make that works whether or not it was included).
OPENRESTY_VENV       := .venv
OPENRESTY_PROXY_DIR  := $(or $(CARGO_TARGET_DIR),target)

.PHONY: openresty-deps nginx-up nginx-down test-openresty test-openai-client-nginx install-openresty bench-openresty rock-build rock-install test-rock

# Debian's nginx package starts a system nginx from its postinst where
# services may start (no policy-rc.d refusing it). That nginx is not used by
# the tests; if this install is what started it, stop it again, so
# `make test` leaves no daemon on port 80 behind. A system nginx that was
# already running is left alone.
openresty-deps:
	@before="$$(cat /run/nginx.pid 2>/dev/null || true)"; \
	scripts/apt-ensure $(OPENRESTY_DEBS); \
	after="$$(cat /run/nginx.pid 2>/dev/null || true)"; \
	if [ -n "$$after" ] && [ "$$after" != "$$before" ] && kill -0 "$$after" 2>/dev/null; then \
	  echo "openresty-deps: stopping the system nginx (pid $$after) that the package install started"; \
	  nginx -s stop 2>/dev/null || kill -QUIT "$$after"; \
	fi

# t/003 runs nginx-conf/nginx.conf as written (scripts/nginx-demo), with
# `llmproxy mock-backend`s as its backends. The suites here run the release
# `llmproxy` that `make serve` builds (the same cargo command, so `make test`
# builds it once; a debug build would be another build of the whole server).
test-openresty: openresty-deps $(OPENRESTY_LIB_TARGET)
	perl -It/lib -c t/lib/Test/LLMProxy/Nginx.pm
	$(CARGO) build -q --release -p llmproxy-server
	LLMPROXY_BIN=$(OPENRESTY_PROXY_DIR)/release/llmproxy LLMP_LIB_DIR="$(CURDIR)/$(OPENRESTY_LIB_DIR)" $(PROVE) $(PROVE_FLAGS) t/

# The README's nginx example: nginx-conf/nginx.conf as written on
# examples/llmproxy.yaml (:8000), mock backends on 127.0.0.1:9001-9003.
# `make nginx-down` stops both (they stop by themselves after an hour).
nginx-up: openresty-deps $(OPENRESTY_LIB_TARGET)
	$(CARGO) build -q --release -p llmproxy-server --bin llmproxy
	LLMPROXY_BIN=$(OPENRESTY_PROXY_DIR)/release/llmproxy scripts/nginx-demo up

nginx-down:
	scripts/nginx-demo down

# The client tests of the standalone gateway, against nginx on the same
# config and `llmproxy mock-backend`s, plus error bodies compared with the
# standalone gateway's.
test-openai-client-nginx: openresty-deps $(OPENRESTY_LIB_TARGET)
	@command -v $(CARGO) >/dev/null 2>&1 || { echo "cargo not found: install the Rust toolchain" >&2; exit 1; }
	$(MAKE) --no-print-directory -f mk/proxy.mk $(OPENRESTY_VENV)/.installed
	$(CARGO) build -q --release -p llmproxy-server
	LLMPROXY_BIN=$(OPENRESTY_PROXY_DIR)/release/llmproxy LLMP_LIB_DIR="$(CURDIR)/$(OPENRESTY_LIB_DIR)" \
	  $(OPENRESTY_VENV)/bin/python t/openai_client_nginx.py

# The Lua modules under openresty/lib/resty/ (install, test-rock).
OPENRESTY_MODULES := $(patsubst openresty/lib/resty/%.lua,%,$(wildcard openresty/lib/resty/*.lua openresty/lib/resty/llmproxy/*.lua))

# Atomic replace: a running nginx keeps the files it has loaded.
install-openresty:
	install -d $(DESTDIR)$(LUA_LDIR)/resty/llmproxy
	for m in $(OPENRESTY_MODULES); do f=resty/$$m.lua; \
	  install -m 0644 openresty/lib/$$f $(DESTDIR)$(LUA_LDIR)/$$f.new && \
	  mv -f $(DESTDIR)$(LUA_LDIR)/$$f.new $(DESTDIR)$(LUA_LDIR)/$$f || exit 1; \
	done

# LuaRocks (openresty/lua-resty-llmproxy-*.rockspec, type "make"): build
# the release library with cargo alone, then install the Lua modules into
# LUA_LDIR and the library as LUA_CDIR/llmproxy.so.
ROCKSPEC := $(wildcard openresty/lua-resty-llmproxy-*.rockspec)
rock-build:
	@# luarocks passes CC, CFLAGS and friends: cargo would rebuild the C parts for them
	env -u CC -u CFLAGS -u LIBFLAG -u LDFLAGS $(CARGO) build --locked --release --manifest-path ffi/Cargo.toml --target-dir ffi/target --features mimalloc

rock-install:
	@test -n "$(LUA_CDIR)" || { echo "rock-install: set LUA_LDIR and LUA_CDIR (luarocks does)" >&2; exit 2; }
	$(MAKE) -f $(firstword $(MAKEFILE_LIST)) --no-print-directory install-openresty LUA_LDIR="$(LUA_LDIR)" DESTDIR=
	install -d $(LUA_CDIR)
	install -m 0755 ffi/target/release/libllmproxy.so $(LUA_CDIR)/llmproxy.so

# The rockspec on a scratch tree: every module lands, and LuaJIT loads the
# engine from the tree's paths alone.
ROCK_TREE := $(CURDIR)/ffi/target/rock-tree
test-rock: openresty-deps
	@scripts/apt-ensure luarocks
	rm -rf $(ROCK_TREE)
	luarocks --tree $(ROCK_TREE) make $(ROCKSPEC)
	for m in $(OPENRESTY_MODULES); do \
	  test -f $(ROCK_TREE)/share/lua/5.1/resty/$$m.lua || { echo "test-rock: resty/$$m.lua missing" >&2; exit 1; }; \
	done
	eval "$$(luarocks --tree $(ROCK_TREE) path)" && luajit -e \
	  'local m = require "llmproxy"; assert(m.new("scripts: {routing: {script: return nil}}")); print("rock: llmproxy " .. m.version .. " from " .. package.searchpath("llmproxy", package.cpath))'

# One run on this machine (openresty/bench/run.sh): the same mock backend
# and load generator as bench-http, release builds of both.
OPENRESTY_BENCH_DOC ?= docs/benchmarks.md
bench-openresty: openresty-deps $(OPENRESTY_LIB_TARGET)
	$(CARGO) build --release -p llmproxy-server --examples --bins
	@echo "bench-openresty on $$(nproc) cores"
	openresty/bench/run.sh $(OPENRESTY_PROXY_DIR)/release "$(CURDIR)/$(OPENRESTY_LIB_DIR)" $(OPENRESTY_BENCH_DOC)
