--- LLMProxy in OpenResty: the hook engine (`llmproxy.so`) in nginx's phases.
--
-- One function per phase; each checks that it runs in its phase. The hook
-- semantics live in the Rust core: this module only translates between
-- nginx and the engine, and applies each hook's failure policy.
--
--     init_worker_by_lua_block  { require("resty.llmproxy").init_worker("/etc/llmproxy/llmproxy.yaml") }
--     upstream llmproxy_backends {
--         server 0.0.0.1;   # placeholder, never used
--         balancer_by_lua_block { require("resty.llmproxy").balancer() }
--     }
--     location /v1/ {
--         access_by_lua_block        { require("resty.llmproxy").access() }
--         header_filter_by_lua_block { require("resty.llmproxy").header_filter() }
--         body_filter_by_lua_block   { require("resty.llmproxy").body_filter() }
--         log_by_lua_block           { require("resty.llmproxy").log() }
--         proxy_pass http://llmproxy_backends;
--     }
--
-- A complete example: `nginx-conf/nginx.conf`; design notes:
-- `docs/adr/020-openresty-host.md`.
--
-- Not yet here (seams are marked `-- seam:`): auth and rate_limit hooks,
-- shared-dict limits, the usage ledger, metrics, error_handler, SSE streams.
--
-- @module resty.llmproxy

-- The request-scoped fields this module writes (the repo's .luacheckrc
-- makes all of `ngx` read-only for openresty/).
-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local balancer = require "ngx.balancer"
local json = require "resty.llmproxy.json"

local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local require = require
local tostring = tostring
local tonumber = tonumber
local error = error
local concat = table.concat
local sort = table.sort
local min = math.min
local fmt = string.format
local find = string.find
local lower = string.lower
local upper = string.upper
local gsub = string.gsub
local match = string.match
local io_open = io.open

local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local NOTICE = ngx.NOTICE
local get_phase = ngx.get_phase
local ngx_now = ngx.now
local ngx_exit = ngx.exit
local ngx_print = ngx.print
local ngx_var = ngx.var
local ngx_header = ngx.header
local req_read_body = ngx.req.read_body
local req_get_body_data = ngx.req.get_body_data
local req_get_body_file = ngx.req.get_body_file
local req_set_body_data = ngx.req.set_body_data
local req_get_headers = ngx.req.get_headers
local req_set_header = ngx.req.set_header
local req_clear_header = ngx.req.clear_header
local resp_get_headers = ngx.resp.get_headers
local set_current_peer = balancer.set_current_peer
local set_more_tries = balancer.set_more_tries
local get_last_failure = balancer.get_last_failure

local _M = { _VERSION = "0.1.0" }

-- Defaults of init_worker's `opts`.
local DEFAULT_MAX_RETRIES = 2 -- like the standalone gateway's retry.max_retries
local DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
local MAX_HEADERS = 100
local MAX_REQUEST_ID = 128

-- Headers a script may not set (nginx computes them), as in the gateway.
local PROTECTED_HEADERS = {
    ["content-length"] = true,
    ["transfer-encoding"] = true,
    ["connection"] = true,
    ["host"] = true,
}

-- Per-worker state. Replaced as a whole by `load`, so a request that
-- started on one engine finishes on it (it keeps `ctx.state`).
local current -- { engine, enabled, backends, by_name, routing_backends, encode, null, ... }

-- lua-cjson, used to validate response bodies and read their `usage`.
local cjson
do
    local ok, lib = pcall(require, "cjson.safe")
    if ok then
        cjson = lib.new()
        cjson.decode_invalid_numbers(false)
        cjson.decode_max_depth(1000)
    end
end

---------------------------------------------------------------- helpers

-- Where each phase's code is written, for error messages.
local PHASE_WHERE = {
    init_worker = "init_worker_by_lua*",
    access = "access_by_lua*",
    balancer = "balancer_by_lua*",
    header_filter = "header_filter_by_lua*",
    body_filter = "body_filter_by_lua*",
    log = "log_by_lua*",
    timer = "an ngx.timer callback",
}

-- Every public function starts here: a clear error in the wrong phase.
local function check_phase(fn, want)
    local phase = get_phase()
    if phase ~= want then
        error(fmt("resty.llmproxy.%s() must be called from %s, not in the %s phase", fn, PHASE_WHERE[want], phase), 3)
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

local function log_hook_error(hook, ctx, err, policy)
    ngx_log(ERR, "llmproxy: ", hook, " hook failed for request ", ctx.id, ": ", describe_error(err), "; ", policy)
end

-- `content-type` -> `Content-Type`, as the standalone gateway shows them.
local function title_case(name)
    return (gsub(lower(name), "^%l", upper):gsub("%-%l", upper))
end

-- An OpenAI-style error the gateway writes itself; ends the request.
local function exit_error(status, message, kind, code)
    local state = current
    local encode = state and state.encode or json.encoder({})
    local body = encode({ error = { message = message, type = kind, code = code } })
    ngx.status = status
    ngx_header["Content-Type"] = "application/json"
    ngx_header["Content-Length"] = #body
    ngx_print(body)
    return ngx_exit(ngx.HTTP_OK)
end

---------------------------------------------------------------- backends

-- `http://10.0.0.1:8000` -> scheme, host, port, path.
local function parse_url(url)
    local scheme, rest = match(url, "^(https?)://(.+)$")
    if not scheme then
        return nil, "not an http(s) URL"
    end
    local host, port, path = match(rest, "^%[([^%]]+)%]:?(%d*)(.*)$")
    if not host then
        host, port, path = match(rest, "^([^/:]+):?(%d*)(.*)$")
    end
    if not host then
        return nil, "no host"
    end
    port = tonumber(port) or (scheme == "https" and 443 or 80)
    if port < 1 or port > 65535 then
        return nil, "port out of range"
    end
    return scheme, host, port, path
end

local function is_ip(host)
    return match(host, "^%d+%.%d+%.%d+%.%d+$") ~= nil or find(host, ":", 1, true) ~= nil
end

-- Headers a backend adds upstream, as one comparable string: retries only
-- go to backends that get the same headers (never leak a backend's key).
local function header_signature(headers)
    if type(headers) ~= "table" then
        return ""
    end
    local parts = {}
    for k, v in pairs(headers) do
        parts[#parts + 1] = lower(tostring(k)) .. "\0" .. tostring(v)
    end
    sort(parts)
    return concat(parts, "\0")
end

-- The backend list: from the engine (`engine:backends()`, the config the
-- engine was built from) when the module offers it, else `opts.backends`.
local function backend_list(engine, opts)
    if opts.backends ~= nil then
        return opts.backends
    end
    local ok, method = pcall(function()
        return engine.backends
    end)
    if ok and method then
        return method(engine)
    end
    return nil, "the llmproxy module has no engine:backends(); pass init_worker(config, {backends = {...}})"
end

-- Parse URLs once; a backend nginx cannot reach is kept (scripts may name
-- it) but marked unusable.
local function load_backends(list)
    local backends, by_name, routing = {}, {}, {}
    for i, b in ipairs(list) do
        local name, url = b.name, b.url
        if type(name) ~= "string" or type(url) ~= "string" then
            return nil, fmt("backends[%d]: needs a string name and url", i)
        end
        if by_name[name] then
            return nil, fmt("backends[%d]: duplicate name '%s'", i, name)
        end
        local scheme, host, port, path = parse_url(url)
        if not scheme then
            return nil, fmt("backend '%s': bad url '%s': %s", name, url, host)
        end
        if host == "localhost" then
            host = "127.0.0.1"
        end
        local usable = true
        if not is_ip(host) then
            ngx_log(WARN, "llmproxy: backend '", name, "': host '", host, "' is not an IP address; ",
                "ngx.balancer cannot resolve names, so it is marked unusable")
            usable = false
        end
        if path ~= "" and path ~= "/" then
            ngx_log(WARN, "llmproxy: backend '", name, "': the URL path '", path,
                "' is ignored; proxy_pass decides the upstream URI")
        end
        local weight = tonumber(b.weight) or 1
        local entry = {
            name = name,
            url = url,
            scheme = scheme,
            host = host,
            port = port,
            weight = weight,
            current = 0, -- smooth weighted round-robin state
            usable = usable,
            headers = type(b.headers) == "table" and b.headers or nil,
            signature = header_signature(b.headers),
        }
        backends[i] = entry
        by_name[name] = entry
        -- The routing hook's `backends` global (health checks: later).
        routing[name] = {
            url = url,
            healthy = usable,
            weight = weight,
            latency_ms = 0,
            active_connections = 0,
        }
    end
    return backends, by_name, routing
end

-- Smooth weighted round-robin (nginx's algorithm) over usable backends not
-- in `exclude`, optionally only those with header signature `signature`.
local function pick_default(state, exclude, signature)
    local best, total = nil, 0
    for _, b in ipairs(state.backends) do
        if b.usable and not (exclude and exclude[b.name]) and (not signature or b.signature == signature) then
            b.current = b.current + b.weight
            total = total + b.weight
            if not best or b.current > best.current then
                best = b
            end
        end
    end
    if best then
        best.current = best.current - total
    end
    return best
end

local function count_alternatives(state, first)
    local n = 0
    for _, b in ipairs(state.backends) do
        if b.usable and b ~= first and b.signature == first.signature then
            n = n + 1
        end
    end
    return n
end

---------------------------------------------------------------- engine

local HOOKS = {
    "routing", "auth", "request_transform", "response_transform", "rate_limit", "usage", "error_handler",
}

-- Build a complete new state; nothing is replaced unless everything worked.
local function load(config, opts)
    opts = opts or {}
    local ok, llmproxy = pcall(require, "llmproxy")
    if not ok then
        return nil, "cannot load the llmproxy module (is libllmproxy.so on lua_package_cpath?): " .. tostring(llmproxy)
    end
    local engine, err = llmproxy.new(config)
    if not engine then
        return nil, "cannot build the engine from " .. describe_config(config) .. ": " .. describe_error(err)
    end
    local list, lerr = backend_list(engine, opts)
    if not list then
        return nil, lerr
    end
    local backends, by_name, routing = load_backends(list)
    if not backends then
        return nil, by_name
    end
    local enabled, names = {}, {}
    for _, hook in ipairs(HOOKS) do
        enabled[hook] = engine:enabled(hook)
        if enabled[hook] then
            names[#names + 1] = hook
        end
    end
    return {
        engine = engine,
        version = llmproxy.version,
        null = llmproxy.null,
        -- Sorted keys: stable bodies upstream and in logs (ADR 020).
        encode = json.encoder(llmproxy, { sort_keys = true }),
        config = describe_config(config),
        enabled = enabled,
        enabled_names = concat(names, ", "),
        backends = backends,
        by_name = by_name,
        routing_backends = routing,
        max_retries = tonumber(opts.max_retries) or DEFAULT_MAX_RETRIES,
        max_response_bytes = tonumber(opts.max_response_bytes) or DEFAULT_MAX_RESPONSE_BYTES,
    }
end

local function install(config, opts)
    local state, err = load(config, opts)
    if not state then
        if current then
            ngx_log(ERR, "llmproxy: ", err, "; keeping the engine loaded from ", current.config)
        else
            ngx_log(ERR, "llmproxy: ", err, "; no engine: requests get 503")
        end
        return nil, err
    end
    current = state
    ngx_log(NOTICE, "llmproxy: engine ", state.version, " loaded from ", state.config, " (", #state.backends,
        " backends; hooks: ", state.enabled_names ~= "" and state.enabled_names or "none", ")")
    return true
end

--- Build this worker's engine from the gateway's YAML config.
--
-- Loads `llmproxy.so` (via `lua_package_cpath`) and builds the engine once
-- per worker: engines hold threads and LuaJIT states, which must not be
-- created in the master and forked. On failure the error is logged and the
-- worker keeps the engine it had (none at startup: requests get 503).
--
-- @tparam string config path of the YAML config (scripts are relative to
--   it), or YAML text
-- @tparam[opt] table opts `backends` (a list of `{name, url, weight?,
--   headers?}`, needed until the module exposes `engine:backends()`),
--   `max_retries` (2), `max_response_bytes` (16 MiB buffered for a
--   response transform)
-- @treturn boolean|nil true, or nil and an error message
-- @phases init_worker
-- @usage init_worker_by_lua_block { require("resty.llmproxy").init_worker("/etc/llmproxy/llmproxy.yaml") }
function _M.init_worker(config, opts)
    check_phase("init_worker", "init_worker")
    return install(config, opts)
end

--- Replace this worker's engine (e.g. from a timer that watches the config).
--
-- Same arguments and failure behaviour as `init_worker`: a config that does
-- not build never replaces a working engine; requests in flight finish on
-- the engine they started with.
-- @phases timer
function _M.reload(config, opts)
    check_phase("reload", "timer")
    return install(config, opts)
end

--- The loaded engine's description, or nil (for tests and status pages).
-- @treturn table|nil `{version, config, hooks, backends}`
-- @phases any
function _M.status()
    local state = current
    if not state then
        return nil
    end
    local names = {}
    for i, b in ipairs(state.backends) do
        names[i] = b.name
    end
    return { version = state.version, config = state.config, hooks = state.enabled_names, backends = names }
end

---------------------------------------------------------------- access

-- The client's id if it is 1..128 visible ASCII characters, else nginx's.
local function request_id(headers)
    local id = headers["x-request-id"]
    if type(id) == "string" and #id <= MAX_REQUEST_ID and match(id, "^[\33-\126]+$") then
        return id
    end
    return ngx_var.request_id
end

-- The whole body as a string (also when nginx spooled it to a file), or
-- nil when there is none. Reading a spooled file blocks the worker briefly:
-- keep client_body_buffer_size at the largest body you expect.
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

-- The `request` global, as the standalone gateway builds it.
local function build_request(ctx)
    local raw, truncated = req_get_headers(MAX_HEADERS)
    if truncated == "truncated" then
        ngx_log(WARN, "llmproxy: more than ", MAX_HEADERS, " request headers; scripts see the first ", MAX_HEADERS)
    end
    local headers = {}
    for name, value in pairs(raw) do
        if type(value) == "table" then
            value = concat(value, ", ")
        end
        headers[title_case(name)] = value
    end
    ctx.id = request_id(raw)
    local request = {
        id = ctx.id,
        headers = headers,
        client_ip = ngx_var.remote_addr,
        path = ngx_var.uri,
    }
    local auth = raw["authorization"]
    if type(auth) == "string" then
        local scheme, key = match(auth, "^(%S+)%s+(.-)%s*$")
        if scheme and lower(scheme) == "bearer" and key ~= "" then
            request.api_key = key
        end
    end
    local body, err = read_request_body()
    if err then
        return nil, err
    end
    if body and body ~= "" then
        request.body_raw = body -- parsed once per hook call, in Rust
    end
    return request
end

-- The routing hook, then the default balancer.
local function route(state, ctx, request)
    local name
    if state.enabled.routing then
        local res, err = state.engine:run("routing", { request = request, backends = state.routing_backends })
        if err then
            if err.kind == "invalid_argument" then
                return nil, err
            end
            log_hook_error("routing", ctx, err, "using the default balancer")
        else
            name = res
        end
    end
    local backend = name and state.by_name[name]
    if backend and not backend.usable then
        ngx_log(WARN, "llmproxy: routing chose backend '", name, "' for request ", ctx.id,
            ", which nginx cannot reach; using the default balancer")
        backend = nil
    end
    if backend then
        ctx.routed = true
    else
        backend = pick_default(state)
    end
    ctx.backend = backend
    return backend
end

local function set_request_header(ctx, name, value)
    if PROTECTED_HEADERS[lower(name)] then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": a script may not set header ", name, "; ignored")
        return
    end
    if value == false or value == ctx.state.null then
        req_clear_header(name)
    else
        req_set_header(name, tostring(value))
    end
end

-- The request_transform hook: new body and header changes, or unchanged.
-- Returns the engine's error when the client's body is the problem.
local function transform_request(state, ctx, request, backend)
    if not state.enabled.request_transform then
        return
    end
    request.backend_url = backend.url
    local res, err = state.engine:run("request_transform", { request = request })
    request.backend_url = nil
    if err then
        if err.kind == "invalid_argument" then
            return err -- the client's body: a 400, as for routing
        end
        log_hook_error("request_transform", ctx, err, "sending the request unchanged")
        return
    end
    if res == nil then
        return
    end
    if res.body ~= nil and res.body ~= state.null then
        local text, eerr = state.encode(res.body)
        if not text then
            log_hook_error("request_transform", ctx, { kind = "bad_output", message = eerr },
                "sending the request unchanged")
            return
        end
        req_set_body_data(text)
    end
    if type(res.headers) == "table" then
        for name, value in pairs(res.headers) do
            set_request_header(ctx, name, value)
        end
    end
end

-- Headers the backend's config adds (e.g. an upstream API key).
local function apply_backend_headers(ctx, backend)
    if backend.headers then
        for name, value in pairs(backend.headers) do
            set_request_header(ctx, name, value)
        end
    end
end

-- seam: auth (standard key checks + auth hook; fails closed with 503)
-- seam: rate_limit (lua_shared_dict llmproxy_limits + rate_limit hook)

--- Route the request and rewrite it for its backend.
--
-- Reads the body (also when spooled to a file), builds the hooks' `request`
-- (`id` from a sane `X-Request-ID` or `$request_id`, headers, client_ip,
-- path, api_key from a Bearer token, the body as raw JSON text), runs
-- `routing` (a failure falls back to the default balancer) and
-- `request_transform` (a failure sends the request unchanged). Answers
-- 503 when no engine is loaded or no backend is usable, 400 when the body
-- is not valid JSON for a hook.
-- @phases access
-- @usage access_by_lua_block { require("resty.llmproxy").access() }
function _M.access()
    check_phase("access", "access")
    local state = current
    if not state then
        return exit_error(503, "the gateway has no engine loaded", "backend_error", "engine_unavailable")
    end
    local ctx = { state = state, started = ngx_now() }
    ngx.ctx.llmproxy = ctx
    local request, err = build_request(ctx)
    if not request then
        ngx_log(ERR, "llmproxy: request ", tostring(ctx.id), ": ", err)
        return exit_error(500, "cannot read the request body", "backend_error", "body_unreadable")
    end
    ctx.request = request
    req_set_header("X-Request-ID", ctx.id)

    local backend
    backend, err = route(state, ctx, request)
    if err then
        return exit_error(400, "the request body is not valid JSON: " .. tostring(err.message), "bad_request",
            "invalid_json")
    end
    if not backend then
        return exit_error(503, "no backend is available", "backend_error", "backend_unavailable")
    end
    apply_backend_headers(ctx, backend)
    err = transform_request(state, ctx, request, backend)
    if err then
        return exit_error(400, "the request body is not valid JSON: " .. tostring(err.message), "bad_request",
            "invalid_json")
    end
end

---------------------------------------------------------------- balancer

--- Send the request to its backend; on a retry, to another one.
--
-- The first try goes to the backend `access()` chose (routing or default
-- balancer) and allows up to `max_retries` more tries over backends that
-- get the same upstream headers; each retry picks another untried one.
-- @phases balancer
-- @usage balancer_by_lua_block { require("resty.llmproxy").balancer() }
function _M.balancer()
    check_phase("balancer", "balancer")
    local ctx = ngx.ctx.llmproxy
    local state = ctx and ctx.state or current
    if not state then
        ngx_log(ERR, "llmproxy: balancer: no engine loaded")
        return ngx_exit(503)
    end
    if not ctx then
        -- access() did not run for this location: default balancer only.
        ctx = { state = state, id = ngx_var.request_id, started = ngx_now() }
        ngx.ctx.llmproxy = ctx
    end
    local backend
    if not ctx.tried then
        backend = ctx.backend or pick_default(state)
        if not backend then
            ngx_log(ERR, "llmproxy: request ", ctx.id, ": no usable backend")
            return ngx_exit(503)
        end
        ctx.tried = { [backend.name] = true }
        ctx.tries = 1
        local more = min(state.max_retries, count_alternatives(state, backend))
        if more > 0 then
            local ok, err = set_more_tries(more)
            if not ok then
                ngx_log(WARN, "llmproxy: set_more_tries: ", err)
            end
        end
    else
        local failure, code = get_last_failure()
        local previous = ctx.backend
        backend = pick_default(state, ctx.tried, previous.signature)
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": backend '", previous.name, "' failed (", tostring(failure),
            code and (" " .. tostring(code)) or "", ")", backend and ("; retrying on '" .. backend.name .. "'") or "")
        if not backend then
            return ngx_exit(502)
        end
        ctx.tried[backend.name] = true
        ctx.tries = ctx.tries + 1
    end
    ctx.backend = backend
    ctx.upstream_started = ngx_now()
    local ok, err = set_current_peer(backend.host, backend.port)
    if not ok then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot use backend '", backend.name, "': ", err)
        return ngx_exit(502)
    end
end

---------------------------------------------------------------- response

local function is_json(content_type)
    return type(content_type) == "string" and find(lower(content_type), "^%s*application/[%w.+-]*json") ~= nil
end

local function is_event_stream(content_type)
    return type(content_type) == "string" and find(lower(content_type), "^%s*text/event%-stream") ~= nil
end

local function response_headers()
    local raw = resp_get_headers(MAX_HEADERS)
    local headers = {}
    for name, value in pairs(raw) do
        if type(value) == "table" then
            value = concat(value, ", ")
        end
        headers[title_case(name)] = value
    end
    return headers
end

--- Decide what the body filter does with this response.
--
-- Adds `X-Request-ID` and `X-LLMProxy-Backend`. For a JSON response of
-- status < 400 that `response_transform` or `usage` needs, it arranges for
-- the body to be buffered; with a transform the body length changes, so
-- `Content-Length` is removed here (headers go out before the body is
-- known). Event streams are left alone for now.
-- @phases header_filter
function _M.header_filter()
    check_phase("header_filter", "header_filter")
    local ctx = ngx.ctx.llmproxy
    if not ctx then
        return
    end
    ngx_header["X-Request-ID"] = ctx.id
    if ctx.backend then
        ngx_header["X-LLMProxy-Backend"] = ctx.backend.name
    end
    local state = ctx.state
    local transform = state.enabled.response_transform
    local usage = state.enabled.usage
    if not (transform or usage) or not ctx.tried then
        return -- nothing to do, or not a response from a backend
    end
    local status = ngx.status
    local content_type = ngx_header["Content-Type"]
    if is_event_stream(content_type) then
        ctx.stream = true -- seam: SSE (per-event transform, usage capture)
        return
    end
    if status >= 400 or not is_json(content_type) then
        return -- seam: error_handler for status >= 400
    end
    if ngx_header["Content-Encoding"] then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": compressed response, not transformed ",
            "(proxy_set_header Accept-Encoding \"\")")
        return
    end
    if not cjson then
        ngx_log(ERR, "llmproxy: response_transform and usage need lua-cjson (cjson.safe); passing through")
        return
    end
    ctx.status = status
    ctx.response_headers = response_headers()
    ctx.chunks, ctx.nbytes = {}, 0
    if transform then
        ctx.transform = true
        ngx_header["Content-Length"] = nil
    end
end

-- The input of response_transform as JSON text, the response body spliced
-- in as it came (validated by cjson first: it is one JSON value, so it
-- cannot add keys of its own).
local function response_input(state, ctx, body, latency_ms)
    local encode = state.encode
    local request, err = encode(ctx.request)
    if not request then
        return nil, err
    end
    local headers
    headers, err = encode(ctx.response_headers)
    if not headers then
        return nil, err
    end
    return concat({
        '{"request":', request,
        ',"backend_url":', json.quote(ctx.backend.url),
        ',"latency_ms":', json.number(latency_ms) or "0",
        ',"response":{"status_code":', ctx.status,
        ',"headers":', headers,
        ',"is_stream":false,"body":', body, "}}",
    })
end

local function latency_ms(ctx)
    return (ngx_now() - (ctx.upstream_started or ctx.started)) * 1000
end

-- Whether a response_transform result asks for another status or other
-- headers than the response has (the seed's example returns them as given).
local function changes_head(ctx, res)
    if res.status_code ~= nil and res.status_code ~= ctx.status then
        return true
    end
    if type(res.headers) == "table" then
        local have = ctx.response_headers
        for name, value in pairs(res.headers) do
            if have[title_case(name)] ~= value then
                return true
            end
        end
    end
    return false
end

-- The response_transform hook on a whole body: the new body, or the old one.
local function transform_response(state, ctx, body)
    local input, err = response_input(state, ctx, body, latency_ms(ctx))
    if not input then
        log_hook_error("response_transform", ctx, { kind = "bad_input", message = err }, "passing the response through")
        return body
    end
    local res
    res, err = state.engine:run("response_transform", input)
    if err then
        log_hook_error("response_transform", ctx, err, "passing the response through")
        return body
    end
    if res == nil then
        return body
    end
    if changes_head(ctx, res) then
        -- seam: a content-phase mode (subrequest) could apply these.
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": response_transform changed the status or headers; ",
            "they were already sent (only the body can change in body_filter)")
    end
    if res.body == nil or res.body == state.null then
        return body
    end
    local text
    text, err = state.encode(res.body)
    if not text then
        log_hook_error("response_transform", ctx, { kind = "bad_output", message = err },
            "passing the response through")
        return body
    end
    return text
end

-- Stop buffering an oversized response: emit what was held back.
local function give_up_buffering(ctx, chunk)
    ngx_log(WARN, "llmproxy: request ", ctx.id, ": response larger than ", ctx.state.max_response_bytes,
        " bytes; passed through without response_transform or usage")
    local held = ctx.transform and concat(ctx.chunks) or ""
    ctx.chunks, ctx.transform = nil, nil
    return held .. chunk
end

--- Buffer a JSON response and apply `response_transform` to it.
--
-- Chunks are held back until the last one when a transform runs (copied
-- and passed on when only `usage` needs the body). A body that is not
-- valid JSON, a failing script or an oversized body passes through.
-- @phases body_filter
function _M.body_filter()
    check_phase("body_filter", "body_filter")
    local ctx = ngx.ctx.llmproxy
    if not ctx or not ctx.chunks then
        return
    end
    local chunk, eof = ngx.arg[1], ngx.arg[2]
    if chunk ~= "" then
        if ctx.nbytes + #chunk > ctx.state.max_response_bytes then
            ngx.arg[1] = give_up_buffering(ctx, chunk)
            return
        end
        ctx.nbytes = ctx.nbytes + #chunk
        ctx.chunks[#ctx.chunks + 1] = chunk
        if ctx.transform then
            ngx.arg[1] = nil
        end
    end
    if not eof then
        return
    end
    local body = concat(ctx.chunks)
    ctx.chunks = nil
    if body == "" then
        return -- HEAD, 204, 304: nothing to transform
    end
    local decoded = cjson.decode(body)
    if decoded == nil then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": the backend's JSON response is not valid JSON; passed through")
        if ctx.transform then
            ngx.arg[1] = body
        end
        return
    end
    if type(decoded) == "table" and type(decoded.usage) == "table" then
        ctx.usage = decoded.usage -- for log(); seam: usage ledger
        ctx.response_body = body
    end
    if ctx.transform then
        ngx.arg[1] = transform_response(ctx.state, ctx, body)
    end
end

---------------------------------------------------------------- log

-- The usage hook's input as JSON text (response body spliced, validated).
local function usage_input(state, ctx)
    local encode = state.encode
    local request, err = encode(ctx.request)
    if not request then
        return nil, err
    end
    local usage
    usage, err = encode(ctx.usage)
    if not usage then
        return nil, err
    end
    local upstream = tonumber(match(ngx_var.upstream_response_time or "", "([%d.]+)%s*$"))
    local latency = upstream and upstream * 1000 or latency_ms(ctx)
    return concat({
        '{"request":', request,
        ',"usage":', usage,
        ',"metadata":{"backend_url":', json.quote(ctx.backend.url),
        ',"latency_ms":', json.number(latency) or "0",
        ',"is_stream":false}',
        ',"response":{"status_code":', ctx.status, ',"body":', ctx.response_body, "}}",
    })
end

local function record_usage(state, ctx)
    if not (ctx.usage and state.enabled.usage) then
        return
    end
    local input, err = usage_input(state, ctx)
    local record
    if input then
        record, err = state.engine:run("usage", input)
    end
    if err then
        log_hook_error("usage", ctx, err, "recording the raw usage")
        record = ctx.usage
    end
    ctx.usage_record = record -- seam: usage ledger (shared dict / upstream sink)
    local text = state.encode(record)
    ngx_log(NOTICE, "llmproxy: usage of request ", ctx.id, " on '", ctx.backend.name, "': ", text)
end

--- Record the request's usage (the `usage` hook on the response's usage).
--
-- The record is kept in `ngx.ctx.llmproxy.usage_record` and logged at
-- NOTICE level; a failing script records the raw usage.
-- @phases log
function _M.log()
    check_phase("log", "log")
    local ctx = ngx.ctx.llmproxy
    if not ctx then
        return
    end
    record_usage(ctx.state, ctx)
    -- seam: metrics (per hook latency and failures, per backend status)
end

-- For tests: parse_url and title_case without nginx.
_M._parse_url = parse_url
_M._title_case = title_case

return _M
