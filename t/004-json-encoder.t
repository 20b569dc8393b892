# resty.llmproxy.json: the encoder for the module's results (ADR 020).
# Uses stand-in markers, so it needs no libllmproxy.so.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_config', <<'CONF');
    init_by_lua_block {
        local json = require "resty.llmproxy.json"
        local array_mt, empty = {}, function() end
        package.loaded.test_markers = { null = ngx.null, empty_array = empty, array_mt = array_mt }
        package.loaded.test_encode = json.encoder(package.loaded.test_markers, { sort_keys = true })
    }
CONF
});

run_tests();

__DATA__

=== TEST 1: values, arrays and objects, markers
--- config
    location = /t {
        content_by_lua_block {
            local m = package.loaded.test_markers
            local encode = package.loaded.test_encode
            local cases = {
                { "s", "a\"b\\c\n\t\1\127" },
                { "ints", { 0, -3, 2^53, -2^53, 1e15 } },
                { "floats", { 0.1, 1 / 3, 2.5e-7, 2^53 + 2^11 } },
                { "bools/null", { true, false, ngx.null } },
                { "empty object", {} },
                { "marked empty array", setmetatable({}, m.array_mt) },
                { "empty_array marker", { a = m.empty_array } },
                { "nested", { b = { 1, { c = {} } }, a = "x", [7] = "seven" } },
                { "sparse is object", { [1] = "a", [3] = "c" } },
            }
            for _, c in ipairs(cases) do
                ngx.say(c[1], ": ", (encode(c[2])))
            end
        }
    }
--- request
GET /t
--- response_body
s: "a\"b\\c\n\t\u0001\u007f"
ints: [0,-3,9007199254740992,-9007199254740992,1000000000000000]
floats: [0.1,0.3333333333333333,2.5e-07,9.00719925474304e+15]
bools/null: [true,false,null]
empty object: {}
marked empty array: []
empty_array marker: {"a":[]}
nested: {"7":"seven","a":"x","b":[1,{"c":{}}]}
sparse is object: {"1":"a","3":"c"}
--- no_error_log
[error]



=== TEST 2: what cannot be JSON is an error, not a crash
--- config
    location = /t {
        content_by_lua_block {
            local encode = package.loaded.test_encode
            local cyclic = {}
            cyclic.self = cyclic
            for _, v in ipairs({ 0 / 0, math.huge, { f = print }, cyclic, { [true] = 1 } }) do
                local text, err = encode(v)
                ngx.say(tostring(text), " ", err)
            end
        }
    }
--- request
GET /t
--- response_body
nil cannot encode nan as JSON
nil cannot encode inf as JSON
nil cannot encode a function as JSON
nil nesting deeper than 200 levels (or a cycle)
nil cannot encode a boolean key as JSON
--- no_error_log
[error]
