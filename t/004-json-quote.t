# resty.llmproxy.json: string literals of the error bodies the module
# writes itself; each must read back (lua-cjson) as the bytes it quoted.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

run_tests();

__DATA__

=== TEST 1: quotes, backslashes and every control character read back unchanged
--- config
    location = /t {
        content_by_lua_block {
            local quote = require("resty.llmproxy.json").quote
            local cjson = require "cjson.safe"
            local controls = {}
            for i = 0, 31 do
                controls[#controls + 1] = string.char(i)
            end
            for _, s in ipairs({ "", "plain", 'say "hi"', "back\\slash", table.concat(controls), "\127",
                "中文 ✓", "</script>" }) do
                local text = quote(s)
                assert(not text:find("[%c]"), "no raw control character in " .. text)
                local back = cjson.decode("[" .. text .. "]")
                assert(back and back[1] == s, text)
            end
            ngx.say(quote('a"b\n'))
        }
    }
--- request
GET /t
--- response_body
"a\"b\n"
--- no_error_log
[error]
