-- resty.llmproxy and the engine it drives (libllmproxy, from ffi/, built
-- with cargo). Run from the repository root:
--
--   luarocks make openresty/lua-resty-llmproxy-0.1.0-1.rockspec
--
-- which runs `make rock-build` (the release library) and `make rock-install`
-- (the Lua modules into the rock's lua dir, the library as llmproxy.so into
-- its lib dir, so the tree's package paths find both). Needs cargo (Rust
-- 1.88+); `make test-rock` checks this file on a scratch tree.
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
   type = "make",
   build_target = "rock-build",
   build_variables = { CFLAGS = "$(CFLAGS)", LIBFLAG = "$(LIBFLAG)" }, -- unused: cargo builds
   install_target = "rock-install",
   install_variables = {
      LUA_LDIR = "$(LUADIR)",
      LUA_CDIR = "$(LIBDIR)",
   },
}
