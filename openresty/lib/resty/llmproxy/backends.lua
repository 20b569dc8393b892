--- The backends of one worker: parsed once from the engine's config, with
-- passive health, latency EWMA, requests in flight and the default
-- balancer -- the standalone gateway's rules (proxy/src/gateway/health.rs,
-- balancer.rs) kept per nginx worker (docs/adr/026-openresty-backends.md).
--
-- Pure Lua over `ngx.now`; used by resty.llmproxy in access (routing,
-- default balancer), balancer (retries) and log (health) phases.
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
local next = next
local concat = table.concat
local max = math.max
local ngx_now = ngx.now

local _M = {}

--- Weight of a new observation in the latency EWMA (the gateway's).
local EWMA_ALPHA = 0.3
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
-- @treturn table|nil the set, or nil and an error
-- @phases any
function _M.new(list, gateway)
    gateway = type(gateway) == "table" and gateway or {}
    local health = type(gateway.health) == "table" and gateway.health or {}
    local gt = type(gateway.timeouts) == "table" and gateway.timeouts or {}
    local set = {
        list = {},
        by_name = {},
        kind = gateway.balancer or "weighted_round_robin",
        failures_to_unhealthy = tonumber(health.failures_to_unhealthy) or 3,
        successes_to_healthy = tonumber(health.successes_to_healthy) or 1,
        cooldown = (tonumber(health.cooldown_ms) or 5000) / 1000,
        version = 0, -- bumped when a backend's health flips
        globals = nil,
        globals_version = -1,
        globals_at = 0,
    }
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
        local entry = {
            name = name,
            url = url,
            scheme = scheme,
            host = host,
            port = port,
            weight = tonumber(b.weight) or 1,
            usable = usable,
            headers = type(b.headers) == "table" and next(b.headers) ~= nil and b.headers or nil,
            signature = header_signature(b.headers),
            -- ngx.balancer.set_timeouts(connect, send, read) per try: nginx's
            -- read timeout covers the wait for the head and every gap after.
            connect_timeout = seconds(t.connect_ms or gt.connect_ms, nil),
            send_timeout = idle,
            read_timeout = (first_byte or idle) and max(first_byte or 0, idle or 0) or nil,
            -- health, as this worker sees it
            healthy = true,
            failures = 0,
            successes = 0,
            last_failure = 0,
            ewma = 0,
            active = 0,
            current = 0, -- smooth weighted round-robin
        }
        set.list[i] = entry
        set.by_name[name] = entry
    end
    return set
end

-- The candidates of `pick`, reused by every call (it never yields, and
-- reads only the entries it wrote): one table fewer per request.
local scratch = {}

--- Whether the balancer may send `b` traffic: reachable, and healthy or
-- unhealthy for longer than the cool-down (a trial request).
local function eligible(set, b, now)
    return b.usable and (b.healthy or now - b.last_failure >= set.cooldown)
end
_M.eligible = eligible

--- Pick a backend with the default balancer.
--
-- Eligible backends not in `exclude` (and with header signature
-- `signature`, if given) first; when none is left, any reachable one not
-- yet tried, since trying beats failing outright.
-- @tparam table set the backend set
-- @tparam[opt] table exclude names already tried
-- @tparam[opt] string signature only backends with these upstream headers
-- @treturn table|nil the backend
-- @phases any
function _M.pick(set, exclude, signature)
    local now = ngx_now()
    local candidates, n = scratch, 0
    for _, b in ipairs(set.list) do
        if b.usable and not (exclude and exclude[b.name]) and (not signature or b.signature == signature)
            and eligible(set, b, now) then
            n = n + 1
            candidates[n] = b
        end
    end
    if n == 0 then
        for _, b in ipairs(set.list) do
            if b.usable and not (exclude and exclude[b.name]) and (not signature or b.signature == signature) then
                n = n + 1
                candidates[n] = b
            end
        end
    end
    if n == 0 then
        return nil
    end
    if n == 1 then
        return candidates[1]
    end
    local best = candidates[1]
    if set.kind == "least_connections" then
        for i = 2, n do
            local b = candidates[i]
            if b.active / max(b.weight, 1) < best.active / max(best.weight, 1) then
                best = b
            end
        end
        return best
    elseif set.kind == "lowest_latency" then
        for i = 2, n do
            if candidates[i].ewma < best.ewma then
                best = candidates[i]
            end
        end
        return best
    end
    local total = 0
    for i = 1, n do
        local b = candidates[i]
        local w = max(b.weight, 1)
        b.current = b.current + w
        total = total + w
        if b.current > best.current then
            best = b
        end
    end
    best.current = best.current - total
    return best
end

--- How many other reachable backends share `first`'s upstream headers
-- (the retries nginx may make).
-- @phases any
function _M.alternatives(set, first)
    local n = 0
    for _, b in ipairs(set.list) do
        if b.usable and b ~= first and b.signature == first.signature then
            n = n + 1
        end
    end
    return n
end

--- A successful exchange with `b` that took `latency_ms` (nil: unknown).
-- @phases any
function _M.success(set, b, latency_ms)
    if latency_ms and latency_ms >= 0 then
        b.ewma = b.ewma == 0 and latency_ms or EWMA_ALPHA * latency_ms + (1 - EWMA_ALPHA) * b.ewma
    end
    b.failures = 0
    if not b.healthy then
        b.successes = b.successes + 1
        if b.successes >= set.successes_to_healthy then
            b.healthy = true
            b.successes = 0
            set.version = set.version + 1
            ngx.log(ngx.NOTICE, "llmproxy: backend '", b.name, "' is healthy again")
        end
    end
end

--- A failed exchange with `b` (connect error, timeout, 5xx).
-- @phases any
function _M.failure(set, b)
    b.successes = 0
    b.last_failure = ngx_now()
    b.failures = b.failures + 1
    if b.failures >= set.failures_to_unhealthy and b.healthy then
        b.healthy = false
        set.version = set.version + 1
        ngx.log(ngx.WARN, "llmproxy: backend '", b.name, "' marked unhealthy after ", b.failures, " failures")
    end
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
    for _, b in ipairs(set.list) do
        backends[b.name] = {
            url = b.url,
            healthy = b.usable and b.healthy,
            weight = b.weight,
            latency_ms = b.ewma,
            active_connections = b.active,
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
