--- The balancer phase: the chosen backend, then retries on another one.
-- @module resty.llmproxy.upstream

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local balancer = require "ngx.balancer"
local metrics = require "resty.llmproxy.metrics"
local backends = require "resty.llmproxy.backends"
local W = require "resty.llmproxy.worker"

local tostring = tostring
local min = math.min
local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local ngx_now = ngx.now
local ngx_exit = ngx.exit
local ngx_var = ngx.var
local set_current_peer = balancer.set_current_peer
local set_more_tries = balancer.set_more_tries
local set_timeouts = balancer.set_timeouts
local get_last_failure = balancer.get_last_failure

local _M = {}

--- Run the balancer phase for this request (`resty.llmproxy.balancer()`, which checks
-- the phase, documents it).
function _M.run()
    local ctx = ngx.ctx.llmproxy
    local state = ctx and ctx.state or W.current
    if not state then
        ngx_log(ERR, "llmproxy: balancer: no engine loaded")
        return ngx_exit(503)
    end
    if not ctx then
        -- access() did not run for this location: default balancer only.
        ctx = { state = state, id = ngx_var.request_id, started = ngx_now() }
        ngx.ctx.llmproxy = ctx
    end
    local set = state.backends
    local backend
    if not ctx.tried then
        backend = ctx.backend or backends.pick(set)
        if not backend then
            ngx_log(ERR, "llmproxy: request ", ctx.id, ": no usable backend")
            return ngx_exit(503)
        end
        ctx.tried = { [backend.name] = true }
        ctx.attempts = { backend }
        ctx.tries = 1
        local more = min(state.max_retries, backends.alternatives(set, backend))
        if more > 0 then
            local ok, err = set_more_tries(more)
            if not ok then
                ngx_log(WARN, "llmproxy: set_more_tries: ", err)
            end
        end
    else
        local reason, code = get_last_failure()
        local previous = ctx.backend
        ctx.previous_view = { backends.finish(set, previous, "failure") }
        backend = backends.pick(set, ctx.tried, previous.group)
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": backend '", previous.name, "' failed (", tostring(reason),
            code and (" " .. tostring(code)) or "", ")", backend and ("; retrying on '" .. backend.name .. "'") or "")
        if not backend then
            return ngx_exit(502)
        end
        ctx.tried[backend.name] = true
        ctx.attempts[#ctx.attempts + 1] = backend
        ctx.tries = ctx.tries + 1
    end
    ctx.backend = backend
    local healthy, ewma, active = backends.begin(set, backend)
    ctx.upstream_started = ngx_now()
    local store = W.store
    if store then
        metrics.backend(store, backend.name, backend.usable and healthy, ewma, active)
        local previous, view = ctx.attempts[#ctx.attempts - 1], ctx.previous_view
        if previous and view then
            metrics.backend(store, previous.name, previous.usable and view[1], view[2], view[3])
        end
    end
    if state.apply_timeouts and (backend.connect_timeout or backend.read_timeout) then
        -- (a request that is not an API call, or whose upstream step did not
        -- say, may be a stream: it gets the stream's timeout)
        local read = ctx.asks_stream == false and backend.read_timeout or backend.stream_read_timeout
        local ok, err = set_timeouts(backend.connect_timeout, backend.send_timeout, read)
        if not ok then
            ngx_log(WARN, "llmproxy: set_timeouts: ", err)
        end
    end
    local ok, err = set_current_peer(backend.host, backend.port)
    if not ok then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot use backend '", backend.name, "': ", err)
        return ngx_exit(502)
    end
end

return _M
