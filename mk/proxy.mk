# The standalone gateway (proxy/): its extra test and benchmark targets.
#
#   make test-openai-client  the official `openai` Python client against
#                            the gateway (project-local .venv)
#   make bench-http          mock vs nginx proxy_pass vs llmproxy
#                            -> docs/benchmarks.md (http-bench section)

PROXY_TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
VENV := .venv
OPENAI_REQUIREMENTS := proxy/tests/openai_client/requirements.txt

TEST_TARGETS += test-openai-client

.PHONY: test-openai-client bench-http

# python3 -m venv needs Debian's python3-venv (ensurepip) on a Debian Python.
$(VENV)/.installed: $(OPENAI_REQUIREMENTS)
	@python3 -m venv $(VENV) 2>/dev/null || { scripts/apt-ensure python3-venv && python3 -m venv --clear $(VENV); }
	$(VENV)/bin/pip install -q --disable-pip-version-check -r $(OPENAI_REQUIREMENTS)
	@touch $@

# The release binary of `make serve` (built once in `make test`).
test-openai-client: check-toolchain $(VENV)/.installed
	$(CARGO) build -q --release -p llmproxy-server
	LLMPROXY_BIN=$(PROXY_TARGET_DIR)/release/llmproxy $(VENV)/bin/python proxy/tests/openai_client/test_openai_client.py

bench-http: check-toolchain
	@scripts/apt-ensure nginx curl
	$(CARGO) build --release -p llmproxy-server --bin llmproxy --example loadgen
	bench/http/run.sh $(PROXY_TARGET_DIR)/release docs/benchmarks.md

# --- keys, limits, ledger, shared state (issue 5) ---
#
#   make bench-accounts      RPS with auth + rate_limit + usage hooks and the
#                            SQLite ledger on vs off, and with Redis state
#                            -> docs/benchmarks.md (account-bench section)
#
# The Redis tests (proxy/tests/redis_*.rs) start their own redis-server,
# the PostgreSQL ledger tests (proxy/tests/ledger_postgres.rs) their own
# PostgreSQL server, the TLS test its certificates (openssl); Debian's
# packages are installed before the Rust tests run.

.PHONY: proxy-test-deps bench-accounts

proxy-test-deps:
	@scripts/apt-ensure redis-server postgresql openssl

test-rust: proxy-test-deps

bench-accounts: check-toolchain
	@scripts/apt-ensure redis-server curl
	$(CARGO) build --release -p llmproxy-server --bin llmproxy --example loadgen
	bench/http/accounts.sh $(PROXY_TARGET_DIR)/release docs/benchmarks.md
