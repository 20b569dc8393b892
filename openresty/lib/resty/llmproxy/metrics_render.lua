--- The Prometheus page of resty.llmproxy's metrics: every worker's counts
-- and gauges in the shared dict, merged (sums for counts, the minimum for
-- `healthy`, the mean for the latency EWMA) and written in the gateway's
-- names, labels and order.
-- @module resty.llmproxy.metrics_render

local metrics = require "resty.llmproxy.metrics"

local pairs = pairs
local ipairs = ipairs
local tonumber = tonumber
local floor = math.floor
local huge = math.huge
local fmt = string.format
local find = string.find
local sub = string.sub
local gsub = string.gsub
local concat = table.concat
local sort = table.sort

-- `# HELP` and `# TYPE` lines of every family, by name (empty when the
-- module cannot load: `init_worker` then says why).
local HEAD
do
    local ok, llmproxy = pcall(require, "llmproxy")
    HEAD = ok and llmproxy.metric_headers() or {}
end
local SEP = metrics.SEP
local UPSTREAM_LE = metrics.UPSTREAM_LE
local HOOK_LE = metrics.HOOK_LE
local POOL_STATS = metrics.POOL_STATS
local LEDGER_STATS = metrics.LEDGER_STATS

local _M = {}

local function escape(v)
    return (gsub(gsub(gsub(v, "\\", "\\\\"), '"', '\\"'), "\n", "\\n"))
end

local function num(v)
    v = tonumber(v) or 0
    if v == floor(v) and v > -9007199254740992 and v < 9007199254740992 then
        return fmt("%d", v)
    end
    if v ~= v then
        return "NaN"
    elseif v == huge then
        return "+Inf"
    elseif v == -huge then
        return "-Inf"
    end
    return fmt("%.17g", v)
end

local function split(key)
    local parts, n, pos = {}, 0, 1
    while true do
        local at = find(key, SEP, pos, true)
        n = n + 1
        if not at then
            parts[n] = sub(key, pos)
            return parts, n
        end
        parts[n] = sub(key, pos, at - 1)
        pos = at + 1
    end
end

local function histogram(out, values, name, prefix, labels, le)
    local sep = labels == "" and "" or ","
    local cumulative = 0
    for i = 1, #le do
        cumulative = cumulative + (values[prefix .. i] or 0)
        out[#out + 1] = fmt('%s_bucket{%s%sle="%s"} %s', name, labels, sep, le[i], num(cumulative))
    end
    local count = values[prefix .. "n"] or 0
    out[#out + 1] = fmt('%s_bucket{%s%sle="+Inf"} %s', name, labels, sep, num(count))
    out[#out + 1] = fmt("%s_sum{%s} %s", name, labels, num(values[prefix .. "s"] or 0))
    out[#out + 1] = fmt("%s_count{%s} %s", name, labels, num(count))
end

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do
        keys[#keys + 1] = k
    end
    sort(keys)
    return keys
end

--- The exposition text (Prometheus text format 0.0.4), merged across workers.
-- @tparam table m the store
-- @tparam table backends backend names, in config order
-- @treturn string the page
-- @phases any
function _M.render(m, backends)
    metrics.sync(m)
    local dict = m.dict
    local values = {}
    local requests, usage = {}, {}
    local gauges = { h = {}, e = {}, a = {}, p = {}, l = {}, i = {} }
    local streams = 0
    for _, key in ipairs(dict:get_keys(0)) do
        local v = dict:get(key)
        if v then
            values[key] = v
            local kind = sub(key, 1, 2)
            if kind == "rq" or kind == "us" then
                local p = split(key)
                local t = kind == "rq" and requests or usage
                t[p[2]] = t[p[2]] or {}
                t[p[2]][p[3]] = (t[p[2]][p[3]] or 0) + v
            elseif kind == "g" .. SEP then
                local p, n = split(key)
                if p[3] == "st" then
                    streams = streams + v
                elseif n == 4 and gauges[p[3]] then
                    local g = gauges[p[3]]
                    g[p[4]] = g[p[4]] or {}
                    g[p[4]][#g[p[4]] + 1] = v
                end
            end
        end
    end

    local out = {}
    out[#out + 1] = HEAD.llmproxy_requests_total
    local names = {}
    for _, b in ipairs(backends) do
        names[#names + 1] = b
    end
    names[#names + 1] = metrics.NO_BACKEND
    local seen = {}
    for _, b in ipairs(names) do
        seen[b] = true
    end
    for _, b in ipairs(sorted_keys(requests)) do
        if not seen[b] then
            names[#names + 1] = b -- a backend of an older config
            seen[b] = true
        end
    end
    for _, b in ipairs(names) do
        local by_status = requests[b]
        if by_status then
            local statuses = sorted_keys(by_status)
            sort(statuses, function(x, y)
                return (tonumber(x) or 0) < (tonumber(y) or 0)
            end)
            for _, s in ipairs(statuses) do
                out[#out + 1] = fmt('llmproxy_requests_total{backend="%s",status="%s"} %s', escape(b), s,
                    num(by_status[s]))
            end
        end
    end

    out[#out + 1] = HEAD.llmproxy_upstream_latency_seconds
    for _, b in ipairs(backends) do
        histogram(out, values, "llmproxy_upstream_latency_seconds", "ul" .. SEP .. b .. SEP,
            fmt('backend="%s"', escape(b)), UPSTREAM_LE)
    end

    out[#out + 1] = HEAD.llmproxy_hook_calls_total
    for _, h in ipairs(metrics.HOOKS) do
        out[#out + 1] = fmt('llmproxy_hook_calls_total{hook="%s"} %s', h, num(values["hc" .. SEP .. h]))
    end
    out[#out + 1] = HEAD.llmproxy_hook_errors_total
    for _, h in ipairs(metrics.HOOKS) do
        for _, k in ipairs(metrics.KINDS) do
            out[#out + 1] = fmt('llmproxy_hook_errors_total{hook="%s",kind="%s"} %s', h, k,
                num(values["he" .. SEP .. h .. SEP .. k]))
        end
    end
    out[#out + 1] = HEAD.llmproxy_hook_duration_seconds
    for _, h in ipairs(metrics.HOOKS) do
        histogram(out, values, "llmproxy_hook_duration_seconds", "hd" .. SEP .. h .. SEP, fmt('hook="%s"', h),
            HOOK_LE)
    end

    out[#out + 1] = HEAD.llmproxy_retries_total
    out[#out + 1] = "llmproxy_retries_total " .. num(values.rt)
    out[#out + 1] = HEAD.llmproxy_active_streams
    out[#out + 1] = "llmproxy_active_streams " .. num(streams > 0 and streams or 0)

    out[#out + 1] = HEAD.llmproxy_usage_total
    for _, b in ipairs(sorted_keys(usage)) do
        for _, k in ipairs(sorted_keys(usage[b])) do
            out[#out + 1] = fmt('llmproxy_usage_total{backend="%s",kind="%s"} %s', escape(b), escape(k),
                num(usage[b][k]))
        end
    end

    local function merged(g, b, how)
        local list = gauges[g][b]
        if not list or #list == 0 then
            return nil
        end
        local acc = how == "min" and huge or 0
        local n = 0
        for _, v in ipairs(list) do
            if how == "min" then
                acc = v < acc and v or acc
            elseif how == "mean" then
                if v > 0 then
                    acc = acc + v
                    n = n + 1
                end
            else
                acc = acc + v
            end
        end
        if how == "mean" then
            return n > 0 and acc / n or 0
        end
        return acc
    end
    out[#out + 1] = HEAD.llmproxy_backend_healthy
    for _, b in ipairs(backends) do
        out[#out + 1] = fmt('llmproxy_backend_healthy{backend="%s"} %s', escape(b), num(merged("h", b, "min") or 1))
    end
    out[#out + 1] = HEAD.llmproxy_backend_latency_ewma_ms
    for _, b in ipairs(backends) do
        out[#out + 1] = fmt('llmproxy_backend_latency_ewma_ms{backend="%s"} %s', escape(b),
            num(merged("e", b, "mean") or 0))
    end
    out[#out + 1] = HEAD.llmproxy_backend_active_connections
    for _, b in ipairs(backends) do
        local active = merged("a", b, "sum") or 0
        out[#out + 1] = fmt('llmproxy_backend_active_connections{backend="%s"} %s', escape(b),
            num(active > 0 and active or 0))
    end
    out[#out + 1] = HEAD.llmproxy_vm_pool
    for _, k in ipairs(POOL_STATS) do
        out[#out + 1] = fmt('llmproxy_vm_pool{stat="%s"} %s', k, num(merged("p", k, "sum") or 0))
    end
    out[#out + 1] = HEAD.llmproxy_hook_ignored_fields_total
    for _, h in ipairs(metrics.HOOKS) do
        out[#out + 1] = fmt('llmproxy_hook_ignored_fields_total{hook="%s"} %s', h, num(merged("i", h, "sum") or 0))
    end
    out[#out + 1] = HEAD.llmproxy_auth_denied_total
    for _, r in ipairs(metrics.AUTH_REASONS) do
        out[#out + 1] = fmt('llmproxy_auth_denied_total{reason="%s"} %s', r, num(values["ad" .. SEP .. r]))
    end
    out[#out + 1] = HEAD.llmproxy_rate_limited_total
    for _, r in ipairs(metrics.RATE_REASONS) do
        out[#out + 1] = fmt('llmproxy_rate_limited_total{reason="%s"} %s', r, num(values["rl" .. SEP .. r]))
    end
    out[#out + 1] = HEAD.llmproxy_auth_failures_total
    out[#out + 1] = 'llmproxy_auth_failures_total{kind="api_key"} ' .. num(values.af or 0)
    out[#out + 1] = HEAD.llmproxy_auth_throttled_total
    out[#out + 1] = 'llmproxy_auth_throttled_total{kind="api_key"} ' .. num(values.at or 0)
    out[#out + 1] = HEAD.llmproxy_state_errors_total
    out[#out + 1] = "llmproxy_state_errors_total " .. num(values.se or 0)
    out[#out + 1] = HEAD.llmproxy_state_skipped_total
    out[#out + 1] = "llmproxy_state_skipped_total " .. num(values.ss or 0)
    out[#out + 1] = HEAD.llmproxy_usage_estimated_total
    out[#out + 1] = "llmproxy_usage_estimated_total " .. num(values.ue or 0)
    out[#out + 1] = HEAD.llmproxy_sse_events_too_large_total
    out[#out + 1] = "llmproxy_sse_events_too_large_total " .. num(values.et or 0)
    if next(gauges.l) then
        for _, k in ipairs(LEDGER_STATS) do
            out[#out + 1] = HEAD[k[2]]
            out[#out + 1] = k[2] .. " " .. num(merged("l", k[1], "sum") or 0)
        end
    end
    out[#out + 1] = ""
    return concat(out, "\n")
end

return _M
