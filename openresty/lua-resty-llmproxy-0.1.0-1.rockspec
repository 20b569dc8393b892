-- The OpenResty glue only: the engine itself is libllmproxy.so, built from
-- ffi/ (`make ffi install`), which must be on lua_package_cpath as
-- llmproxy.so or libllmproxy.so (see nginx-conf/nginx.conf).
package = "lua-resty-llmproxy"
version = "0.1.0-1"
source = {
   url = "git+https://example.invalid/llmproxy.git",
   tag = "v0.1.0",
}
description = {
   summary = "LLMProxy's scriptable LLM gateway hooks in OpenResty / nginx phases",
   detailed = [[
resty.llmproxy runs LLMProxy's sandboxed Lua hooks (routing, request and
response transforms on JSON and SSE streams, usage, error_handler, ...) in
nginx's access, balancer, header_filter, body_filter and log phases, on the
same YAML config as the standalone gateway, with Prometheus metrics merged
across workers.
]],
   license = "Apache-2.0",
}
dependencies = {
   "lua >= 5.1, < 5.2",   -- LuaJIT 2.1 under lua-nginx-module >= 0.10.16
}
build = {
   type = "builtin",
   modules = {
      ["resty.llmproxy"] = "lib/resty/llmproxy.lua",
      ["resty.llmproxy.json"] = "lib/resty/llmproxy/json.lua",
      ["resty.llmproxy.sse"] = "lib/resty/llmproxy/sse.lua",
      ["resty.llmproxy.metrics"] = "lib/resty/llmproxy/metrics.lua",
      ["resty.llmproxy.backends"] = "lib/resty/llmproxy/backends.lua",
   },
}
