-- luacheck configuration: LuaJIT 2.1 (Lua 5.1 + bit), no globals.
std = "luajit"
max_line_length = 120
files["core/src/sandbox/prelude.lua"] = { std = "min" }
files["core/src/convert/lazy.lua"] = { std = "min" }
files["openresty/"] = { read_globals = { "ngx" } }
