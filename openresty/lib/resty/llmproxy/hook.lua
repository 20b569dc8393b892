--- Hook calls from the phases: the engine's call, its metrics, the
-- script's log lines in the error log.
-- @module resty.llmproxy.hook

local ngx = ngx
local metrics = require "resty.llmproxy.metrics"
local W = require "resty.llmproxy.worker"

local pairs = pairs
local require = require
local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local INFO = ngx.INFO
local clock = require("resty.llmproxy.util").clock
local describe_error = require("resty.llmproxy.util").describe_error

local _M = {}

-- `engine:run*` option: results' `body` as JSON text, from Rust.
local BODY_JSON = { body_json = true }

-- "<hook> hook failed for request <id>: <error>; <what happens now>".
local function log_hook_error(hook, ctx, err, policy)
    ngx_log(ERR, "llmproxy: ", hook, " hook failed for request ", ctx.id, ": ", describe_error(err), "; ", policy)
end

-- Log levels of scripts' `log.*` lines (`print` is `log.info`).
local SCRIPT_LOG_LEVEL = { info = INFO, warn = WARN, error = ERR }

-- Write the lines a hook call's script logged to the error log, tagged as
-- the gateway tags them (request id, hook, script).
local function script_log(lines)
    for i = 1, #lines do
        local l = lines[i]
        ngx_log(SCRIPT_LOG_LEVEL[l.level] or INFO, "llmproxy: script log: ", l.message, " (request_id=",
            l.request_id, ", hook=", l.hook, ", script=", l.script, ")")
    end
end

-- Count a hook's call (its time since `t0`; not a failure of the host's
-- input) and log its failure: `denied` under on_error: deny, `fell` when
-- the core fell back (`policy`: `{fallback, deny}`, what happens then).
local function account(ctx, hook, policy, t0, denied, fell)
    local failed = denied or fell
    if W.store and (not failed or failed.hook) then
        metrics.hook_call(W.store, hook, clock() - t0, failed and failed.kind)
    end
    if denied then
        log_hook_error(hook, ctx, denied, policy[2] .. " (on_error: deny)")
    elseif fell then
        log_hook_error(hook, ctx, fell, policy[1])
    end
end

--- Run `hook` outside the request handle's steps (error_handler) on the
-- request `req` with the other globals as a table,
-- its failure policy applied by the core (`engine:run_step`, as the
-- handle's steps and the gateway apply it); metrics, script log lines and
-- the error log line as for a handle's step.
-- @tparam table state the engine state the request runs on
-- @tparam table ctx the request's context
-- @tparam string hook the hook
-- @tparam table policy what happens when the hook fails: `{fallback, deny}`
-- @tparam userdata req an `llmproxy.request`
-- @tparam table globals the other globals (`request` is set here)
-- @tparam[opt] table opts `engine:run` options
-- @return the result (nil also when the hook failed and fell back), the
-- error that denies the request, the failure the core fell back from
local function run_step(state, ctx, hook, policy, req, globals, opts)
    local t0 = clock()
    globals.request = req
    local res, denied, lines, fell = state.engine:run_step(hook, globals, opts)
    if lines then
        script_log(lines)
    end
    account(ctx, hook, policy, t0, denied, fell)
    return res, denied, fell
end

--- Run one step of the request's handle (`ctx.h`, core's
-- `RequestHandle`: `h:route`, `h:upstream`, `h:respond`, `h:event`,
-- `h:usage`), which applies the hook's failure policy itself: counts the
-- hook's call when its script ran, writes its script's log lines to the
-- error log and logs a failure, whether the core fell back from it
-- (`policy[1]` says what happens instead) or it denies the request.
-- @tparam table ctx the request's context
-- @tparam string hook the step's hook
-- @tparam table policy what happens when the hook fails: `{fallback,
-- deny}` (e.g. `{"using the default balancer", "refusing the request"}`)
-- @tparam function method the handle's method (e.g. `h.route`)
-- @param ... its arguments
-- @return the decision, or nil and the error that denies the request; or
-- nil, nil and the error of the host's input (a bug of this module,
-- logged: the data path goes on as without the hook, admission refuses)
local function step(ctx, hook, policy, method, ...)
    local t0 = ctx.state.enabled[hook] and clock() -- a hook without a script is never timed
    local res, err, lines, called, fell_back = method(ctx.h, ...)
    if lines then
        script_log(lines)
    end
    if err and not err.hook then
        -- The host's input (a bug of this module), not the script's.
        ngx_log(ERR, "llmproxy: ", hook, " step of request ", ctx.id, " failed: ", describe_error(err))
        return nil, nil, err
    end
    if not (t0 and called) then
        return res -- no script ran: nothing to count, nothing failed
    end
    account(ctx, hook, policy, t0, err, fell_back)
    return res, err
end

--- Run one hook as the phases call the engine (a request handle, other
-- globals as a table, metrics counted, script lines logged), on the
-- worker's engine or `engine`, with its error returned as it came (no
-- failure policy: the cases check the error). For the nginx conformance
-- tests.
-- @tparam userdata|nil engine an engine (nil: this worker's)
-- @tparam string hook the hook
-- @tparam table input the hook's globals, `request` as a table
-- @treturn any the result, or nil and an error
-- @phases any
function _M.run_input(engine, hook, input)
    local state = W.current
    if engine then
        state = { engine = engine, llmproxy = require "llmproxy" }
    end
    local globals = {}
    for k, v in pairs(input) do
        if k ~= "request" then
            globals[k] = v
        end
    end
    local req, err = state.llmproxy.request(input.request or {})
    if not req then
        return nil, err
    end
    globals.request = req
    local t0 = clock()
    local res, rerr, lines = state.engine:run(hook, globals)
    if W.store and (not rerr or rerr.hook) then
        metrics.hook_call(W.store, hook, clock() - t0, rerr and rerr.kind)
    end
    if lines then
        script_log(lines)
    end
    return res, rerr
end

_M.BODY_JSON = BODY_JSON
_M.step = step
_M.run_step = run_step

return _M
