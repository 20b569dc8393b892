--- The backends of one worker: parsed once from the engine's config, with
-- the core's default balancer and backend health (`llmproxy.balancer`:
-- passive health, latency EWMA, requests in flight, the pick; the rules the
-- standalone gateway follows) kept per nginx worker
-- (docs/adr/026-openresty-backends.md). What is nginx's own stays here:
-- which backends nginx can reach, and which a retry may go to.
--
-- Used by resty.llmproxy in access (routing, default balancer), balancer
-- (retries) and log (health) phases.
--
-- @module resty.llmproxy.backends

local ngx = ngx
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local fmt = string.format
local find = string.find
local lower = string.lower
local match = string.match
local sort = table.sort
local concat = table.concat
local max = math.max
local ngx_now = ngx.now

local _M = {}

--- Routing globals are rebuilt at least this often (seconds), so scripts
-- see fresh `latency_ms` and `active_connections`; a health change
-- rebuilds them at once.
_M.GLOBALS_MAX_AGE = 1

--- `http://10.0.0.1:8000/path` -> scheme, host, port, path (or nil, err).
-- @tparam string url the backend URL
-- @phases any
function _M.parse_url(url)
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

-- The backend's config headers nginx sends: a `Host` is not (proxy_pass
-- writes its own; the gateway sends it), said once here. nil for none.
local function sent_headers(name, headers)
    if type(headers) ~= "table" then
        return nil
    end
    local sent
    for k, v in pairs(headers) do
        if lower(tostring(k)) == "host" then
            ngx.log(ngx.WARN, "llmproxy: backend '", name, "': headers.", k,
                " is not sent: proxy_pass writes the Host header itself")
        else
            sent = sent or {}
            sent[k] = v
        end
    end
    return sent
end

local function seconds(ms, default)
    ms = tonumber(ms)
    if not ms or ms <= 0 then
        return default
    end
    return ms / 1000
end

--- Build the backend set.
--
-- A backend nginx cannot reach (a host name: `ngx.balancer` takes IP
-- addresses only) is kept, since scripts may name it, but marked unusable
-- with a warning.
-- @tparam table list `{ {name, url, weight?, headers?, timeouts?}, ... }`
--   (`engine:backends()`)
-- @tparam[opt] table gateway `engine:gateway()` (balancer kind, health, timeouts)
-- @tparam table llmproxy the module (`require "llmproxy"`), for its balancer
-- @treturn table|nil the set, or nil and an error
-- @phases any
function _M.new(list, gateway, llmproxy)
    gateway = type(gateway) == "table" and gateway or {}
    local gt = type(gateway.timeouts) == "table" and gateway.timeouts or {}
    local set = {
        list = {},
        by_name = {},
        balancer = nil, -- llmproxy.balancer over `list`, in its order
        version = 0, -- bumped when a backend's health flips
        globals = nil,
        globals_version = -1,
        globals_at = 0,
    }
    local groups, ngroups, shape = {}, 0, {}
    for i, b in ipairs(list) do
        local name, url = b.name, b.url
        if type(name) ~= "string" or type(url) ~= "string" then
            return nil, fmt("backends[%d]: needs a string name and url", i)
        end
        if set.by_name[name] then
            return nil, fmt("backends[%d]: duplicate name '%s'", i, name)
        end
        local scheme, host, port, path = _M.parse_url(url)
        if not scheme then
            return nil, fmt("backend '%s': bad url '%s': %s", name, url, host)
        end
        if host == "localhost" then
            host = "127.0.0.1"
        end
        local usable = true
        if not is_ip(host) then
            ngx.log(ngx.WARN, "llmproxy: backend '", name, "': host '", host, "' is not an IP address; ",
                "ngx.balancer cannot resolve names, so it is marked unusable")
            usable = false
        end
        if path ~= "" and path ~= "/" then
            ngx.log(ngx.WARN, "llmproxy: backend '", name, "': the URL path '", path,
                "' is ignored; proxy_pass decides the upstream URI")
        end
        local t = type(b.timeouts) == "table" and b.timeouts or gt
        local first_byte = seconds(t.first_byte_ms or gt.first_byte_ms, nil)
        local idle = seconds(t.idle_ms or gt.idle_ms, nil)
        local headers = sent_headers(name, b.headers)
        local signature = header_signature(headers)
        local group = groups[signature]
        if not group then
            ngroups = ngroups + 1
            group = ngroups
            groups[signature] = group
        end
        local weight = tonumber(b.weight) or 1
        shape[i] = { weight = weight, usable = usable, group = group }
        local entry = {
            index = i,
            name = name,
            url = url,
            scheme = scheme,
            host = host,
            port = port,
            weight = weight,
            usable = usable,
            headers = headers,
            -- backends with the same upstream headers: the ones a retry may go to
            group = group,
            -- ngx.balancer.set_timeouts(connect, send, read) per try: nginx's
            -- one read timeout covers the wait for the head and every gap
            -- after. A stream needs both, so it gets the larger; a whole
            -- answer comes at once after its head, so the wait for the head
            -- is the one that matters: first_byte_ms (the gateway's
            -- deadline for it), else idle_ms.
            connect_timeout = seconds(t.connect_ms or gt.connect_ms, nil),
            send_timeout = idle,
            stream_read_timeout = (first_byte or idle) and max(first_byte or 0, idle or 0) or nil,
            read_timeout = first_byte or idle,
        }
        set.list[i] = entry
        set.by_name[name] = entry
    end
    local ok, balancer = pcall(llmproxy.balancer,
        { kind = gateway.balancer, health = gateway.health, backends = shape })
    if not ok then
        return nil, tostring(balancer)
    end
    set.balancer = balancer
    return set
end

--- Pick a backend with the default balancer (the core's).
--
-- Eligible backends nginx can reach, not in `exclude` (and in `group`, if
-- given) first; when none is left, any reachable one not yet tried, since
-- trying beats failing outright.
-- @tparam table set the backend set
-- @tparam[opt] table exclude names already tried
-- @tparam[opt] number group only backends of this group (the same upstream headers)
-- @treturn table|nil the backend
-- @phases any
function _M.pick(set, exclude, group)
    local skip
    if exclude then
        skip = {}
        for name in pairs(exclude) do
            local b = set.by_name[name]
            if b then
                skip[b.index] = true
            end
        end
    end
    local i = set.balancer:pick(ngx_now() * 1000, skip, group)
    return i and set.list[i]
end

--- A request goes to `b`.
-- @treturn boolean healthy
-- @treturn number latency EWMA (ms)
-- @treturn number requests in flight
-- @phases any
function _M.begin(set, b)
    return set.balancer:begin(b.index)
end

-- Say that `b`'s health changed (the balancer's `change`), and bump the
-- set's version (routing's globals are rebuilt).
local function changed(set, b, change, failures)
    set.version = set.version + 1
    if change == "unhealthy" then
        ngx.log(ngx.WARN, "llmproxy: backend '", b.name, "' marked unhealthy after ", failures, " failures")
    else
        ngx.log(ngx.NOTICE, "llmproxy: backend '", b.name, "' is healthy again")
    end
end

--- The request sent to `b` ended: `verdict` "success" (its whole answer,
-- or a stream's start, came `latency_ms` after it was sent), "failure"
-- (connect error, timeout, 5xx, an answer cut on a bound), or nil (no
-- verdict: the client left first).
-- @treturn boolean healthy
-- @treturn number latency EWMA (ms)
-- @treturn number requests in flight
-- @phases any
function _M.finish(set, b, verdict, latency_ms)
    local healthy, ewma, active, change, failures = set.balancer:finish(b.index, verdict, ngx_now() * 1000,
        latency_ms)
    if change then
        changed(set, b, change, failures)
    end
    return healthy, ewma, active
end

--- An active probe of `b` ended: `verdict` "success" (a 2xx to
-- `health.probe_path`) or "failure"; counts as a request's would.
-- @treturn boolean healthy
-- @treturn number latency EWMA (ms)
-- @treturn number requests in flight
-- @phases any
function _M.probed(set, b, verdict)
    local healthy, ewma, active, change, failures = set.balancer:probed(b.index, verdict, ngx_now() * 1000)
    if change then
        changed(set, b, change, failures)
    end
    return healthy, ewma, active
end

--- How many other reachable backends share `first`'s upstream headers
-- (the retries nginx may make).
-- @phases any
function _M.alternatives(set, first)
    local n = 0
    for _, b in ipairs(set.list) do
        if b.usable and b ~= first and b.group == first.group then
            n = n + 1
        end
    end
    return n
end

--- The routing hook's `backends` global as one `llmproxy.globals` handle,
-- parsed once and reused until a backend's health changes or it is
-- `GLOBALS_MAX_AGE` seconds old.
-- @tparam table set the backend set
-- @tparam table llmproxy the module (`require "llmproxy"`)
-- @treturn userdata|nil the handle, or nil and an error
-- @phases any
function _M.routing_globals(set, llmproxy)
    local now = ngx_now()
    if set.globals and set.globals_version == set.version and now - set.globals_at < _M.GLOBALS_MAX_AGE then
        return set.globals
    end
    local backends = {}
    local balancer = set.balancer
    for i, b in ipairs(set.list) do
        local healthy, latency_ms, active = balancer:view(i)
        backends[b.name] = {
            url = b.url,
            healthy = b.usable and healthy,
            weight = b.weight,
            latency_ms = latency_ms,
            active_connections = active,
        }
    end
    local g, err = llmproxy.globals({ backends = backends })
    if not g then
        return nil, err
    end
    set.globals, set.globals_version, set.globals_at = g, set.version, now
    return g
end

return _M
