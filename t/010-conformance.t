# The shared conformance cases (conformance/cases/*.json) inside nginx:
# every case through the code path resty.llmproxy's phases use (a request
# handle built by llmproxy.request, the other globals converted with it,
# the hook run by the module as the phases run it), in a content
# handler. Prints "N passed, N failed" in the TAP output.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

run_tests();

__DATA__

=== TEST 1: every conformance case passes inside nginx
--- http_config
    lua_shared_dict llmproxy_metrics 1m;
--- config
    location = /t {
        content_by_lua_block {
            require("llmproxy_conformance").run_all("$TEST_NGINX_REPO/conformance/cases")
        }
    }
--- request
GET /t
--- timeout: 30
--- diag_body
^(FAIL |\d+ passed)
--- response_body_like
\A(ok   [^\n]+\n){90,}[1-9]\d* passed, 0 failed\n\z
--- no_error_log
[alert]
[crit]
