--- Small helpers of the nginx host's phases: clock, names, lists, content
-- types. No state beyond a cache of header names.
-- @module resty.llmproxy.util

local ngx = ngx

local type = type
local pcall = pcall
local require = require
local tostring = tostring
local tonumber = tonumber
local find = string.find
local sub = string.sub
local lower = string.lower
local match = string.match
local gmatch = string.gmatch
local NOTICE = ngx.NOTICE
local ngx_now = ngx.now

local _M = {}

-- The error_log level of the request (usage lines are logged at NOTICE:
-- encoded only when they would be written).
local log_level
do
    local ok, errlog = pcall(require, "ngx.errlog")
    if ok then
        log_level = errlog.get_sys_filter_level
    else
        log_level = function()
            return NOTICE
        end
    end
end

local MAX_HEADERS = 100

-- A monotonic clock in seconds with sub-microsecond resolution, for hook
-- latency (ngx.now() is cached per event loop turn and has ms resolution).
local clock
do
    local ok, ffi = pcall(require, "ffi")
    if ok then
        ok = pcall(ffi.cdef, [[
            typedef struct { long tv_sec; long tv_nsec; } llmproxy_timespec_t;
            int clock_gettime(int clk_id, llmproxy_timespec_t *tp);
        ]])
    end
    if ok then
        local ts = ffi.new("llmproxy_timespec_t")
        local C = ffi.C
        clock = function()
            C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
            return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
        end
    else
        clock = function()
            ngx.update_time()
            return ngx_now()
        end
    end
end

local function describe_config(config)
    if type(config) == "string" and not find(config, "\n", 1, true) then
        return config
    end
    return "inline YAML"
end

-- "kind: message (script:line)" for logs.
local function describe_error(err)
    if type(err) ~= "table" then
        return tostring(err)
    end
    local where = ""
    if err.script then
        where = " (" .. tostring(err.script) .. (err.line and (":" .. tostring(err.line)) or "") .. ")"
    end
    return tostring(err.kind) .. ": " .. tostring(err.message) .. where
end

-- The last entry of an `$upstream_*` list ("0.001, 0.002 : 0.003").
local function last_entry(list)
    if not list or list == "" then
        return nil
    end
    return match(list, "([^,:%s]+)%s*$")
end

-- Every entry of an `$upstream_*` list.
local function entries(list)
    local out = {}
    if list then
        for v in gmatch(list, "[^,:%s]+") do
            out[#out + 1] = v
        end
    end
    return out
end

-- The request's id: the client's X-Request-ID when core accepts it, else
-- a new one, as the gateway makes it (`llmproxy.request_id`: core's rule
-- and generator; nginx's $request_id would cost the worker 16 random bytes
-- from OpenSSL per request).
local core_request_id
local function request_id(headers)
    local id = headers["x-request-id"]
    core_request_id = core_request_id or require("llmproxy").request_id
    return core_request_id(type(id) == "string" and id or nil)
end

-- The path of the request as the client wrote it: `$request_uri`
-- without its query string.
local function request_path()
    local target = ngx.var.request_uri or "/"
    local q = find(target, "?", 1, true)
    return q and sub(target, 1, q - 1) or target
end

local function is_json(content_type)
    return type(content_type) == "string" and find(lower(content_type), "^%s*application/[%w.+-]*json") ~= nil
end

local function latency_ms(ctx)
    return (ngx_now() - (ctx.upstream_started or ctx.started)) * 1000
end

-- The request's `llmproxy.request` for error_handler (outside the
-- handle's steps) and the ledger's model, made from its handle
-- on first use (most requests need none), or nil without a handle.
local function request_of(ctx)
    local req = ctx.req
    if req == nil and ctx.h then
        req = ctx.h:request()
        ctx.req = req
    end
    return req
end

_M.request_of = request_of
_M.log_level = log_level
_M.MAX_HEADERS = MAX_HEADERS
_M.clock = clock
_M.describe_config = describe_config
_M.describe_error = describe_error
_M.last_entry = last_entry
_M.entries = entries
_M.request_id = request_id
_M.request_path = request_path
_M.is_json = is_json
_M.latency_ms = latency_ms

return _M
