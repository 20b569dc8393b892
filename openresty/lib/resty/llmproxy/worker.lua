--- This worker's state, shared by the phase modules.
--
-- `current` is the installed engine state (replaced as a whole by a load,
-- so a request that started on one engine finishes on it: it keeps
-- `ctx.state`); `store` is the worker's metrics store (nil without the
-- shared dict).
-- @module resty.llmproxy.worker

local _M = {
    current = nil,
    store = nil,
}

return _M
