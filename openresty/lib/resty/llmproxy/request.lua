--- The access phase's first step: the request's id, headers, key and body,
-- parsed once (in Rust) into the request handle (`engine:handle`) every
-- hook of the request runs on.
-- @module resty.llmproxy.request

local ngx = ngx

local tostring = tostring
local tonumber = tonumber
local io_open = io.open
local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local ngx_var = ngx.var
local req_read_body = ngx.req.read_body
local req_get_body_data = ngx.req.get_body_data
local req_get_body_file = ngx.req.get_body_file
local req_get_headers = ngx.req.get_headers
local req_get_method = ngx.req.get_method
local req_set_header = ngx.req.set_header
local req_clear_header = ngx.req.clear_header
local req_set_uri = ngx.req.set_uri
local find = string.find
local MAX_HEADERS = require("resty.llmproxy.util").MAX_HEADERS
local describe_error = require("resty.llmproxy.util").describe_error
local request_id = require("resty.llmproxy.util").request_id
local request_path = require("resty.llmproxy.util").request_path
local failure = require("resty.llmproxy.failure").new
local known_failure = require("resty.llmproxy.failure").known

local _M = {}

-- The whole body as a string (also when nginx spooled it to a file), or
-- nil when there is none. Reading a spooled file blocks the worker (the
-- one blocking read of this module): nginx spools a body only above
-- client_body_buffer_size, so set that to gateway.max_body_bytes.
local function read_request_body()
    req_read_body()
    local data = req_get_body_data()
    if data then
        return data
    end
    local path = req_get_body_file()
    if not path then
        return nil
    end
    local f, err = io_open(path, "rb")
    if not f then
        return nil, "cannot read the spooled request body: " .. tostring(err)
    end
    data = f:read("*a")
    f:close()
    return data
end

-- The hooks' `request` as a table, with the key's user when `entry` (the
-- key's record) is known. The headers go as nginx gives them: the core puts
-- them in the form scripts see in every host.
local function request_fields(ctx, raw, api_key, entry)
    return {
        id = ctx.id,
        headers_raw = raw,
        client_ip = ngx_var.remote_addr,
        path = ctx.path or ngx_var.uri,
        api_key = api_key,
        user_id = entry and entry.info.user_id,
    }
end

-- The configured key behind `api_key`: `{info, fp}` (info: the record as
-- a table, the scripts' `key_info`), or nil. Known keys are cached per
-- engine; unknown ones are not (a client could fill the cache).
local function key_entry(state, api_key)
    if not api_key then
        return nil
    end
    local e = state.keys[api_key]
    if e == nil then
        local info, fp = state.engine:key(api_key)
        if not info then
            return nil
        end
        e = { info = info, fp = fp, configured_used = tonumber(info.used_quota) or 0 }
        state.keys[api_key] = e
    end
    return e
end

-- The request's path in core's canonical form (`llmproxy.canonical_path`,
-- the gateway's rule: endpoints match on it, scripts see it, it goes
-- upstream), or nil and why there is none. nginx's `$uri` is its own
-- decoding, and proxy_pass sends the path as the client wrote it; a path
-- whose canonical form differs is set as the request's URI, which
-- proxy_pass then sends instead. nginx escapes such a URI itself (a `%`
-- too), so one whose canonical form keeps a percent-escape cannot be
-- forwarded in that form: it is refused.
-- @param state the worker's engine state
-- @treturn string|nil the canonical path
-- @treturn string|nil why the path has none
function _M.canonical_path(state)
    local raw = request_path()
    local path, err = state.llmproxy.canonical_path(raw)
    if not path or path == raw then
        return path, err
    end
    if find(path, "%", 1, true) then
        return nil, "nginx cannot forward this path in its canonical form (" .. path .. "); send that form"
    end
    req_set_uri(path)
    return path
end

-- Request headers nginx's proxy module writes itself.
local NGINX_FRAMED = { host = true, ["content-length"] = true, ["transfer-encoding"] = true }

-- Read the body and parse the request once into its handle, `ctx.h`. Returns a
-- failure when the request cannot go on.
local function prepare_request(state, ctx)
    local raw, truncated = req_get_headers(MAX_HEADERS)
    if truncated == "truncated" then
        ngx_log(WARN, "llmproxy: more than ", MAX_HEADERS, " request headers; scripts see the first ", MAX_HEADERS)
    end
    ctx.id = request_id(raw)
    req_set_header("X-Request-ID", ctx.id)
    -- Headers that describe the client's connection (the fixed hop-by-hop
    -- names and every name its Connection header lists) stay on this hop.
    -- nginx frames the upstream message itself (Host, Content-Length,
    -- Transfer-Encoding): those are left to it.
    local hop = state.llmproxy.hop_by_hop(raw)
    if hop then
        for i = 1, #hop do
            local name = hop[i]
            if not NGINX_FRAMED[name] then
                req_clear_header(name)
            end
        end
    end
    -- The key (core's rule, the gateway's): Bearer, else x-api-key; a
    -- header sent twice (a table here) presents none.
    local api_key = state.llmproxy.api_key(raw["authorization"], raw["x-api-key"])
    local entry = key_entry(state, api_key)
    local fields = request_fields(ctx, raw, api_key, entry)
    ctx.key = entry
    -- Settled by the headers before anything can fail, as in the gateway:
    -- only an identified caller's failures go through error_handler.
    ctx.identified = state.admission.auth and state.engine:caller_identified(fields.api_key, fields.client_ip)
    ctx.fields = fields -- error_handler's request if the body cannot be parsed
    if ctx.path_error then
        return known_failure("invalid_path", ctx.path_error)
    end
    local limit = state.max_body_bytes
    local declared = tonumber(raw["content-length"])
    if declared and declared > limit then
        return known_failure("body_too_large", limit)
    end
    local body, err = read_request_body()
    if err then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": ", err)
        return known_failure("body_unreadable", err)
    end
    if body and #body > limit then
        return known_failure("body_too_large", limit)
    end
    ctx.api_key = fields.api_key
    -- One handle per request (core's): the body parsed as the gateway
    -- parses it (an API call's must be a JSON object whose OpenAI fields
    -- have their types; any other's is seen when it happens to be JSON).
    local h, herr = state.engine:handle(fields, body or "", req_get_method())
    if not h then
        if herr.code then
            return failure(herr.type, herr.status, herr.code, herr.message)
        end
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": ", describe_error(herr))
        return failure("bad_request", 400, "bad_request", "the request cannot be read: " .. tostring(herr))
    end
    ctx.h = h
    ctx.api = h:api()
    return nil
end

_M.prepare = prepare_request

return _M
