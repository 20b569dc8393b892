--- Timing for the LuaJIT benchmarks of `make bench-ffi`: each call timed on
-- its own with CLOCK_MONOTONIC, reported in the line format
-- `bench/ffi/report.py` reads.
-- @module timer

local ffi = require "ffi"

ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } llmp_bench_timespec;
  int clock_gettime(int clk_id, llmp_bench_timespec *tp);
]]

local C = ffi.C
local floor = math.floor
local sort = table.sort
local ts = ffi.new("llmp_bench_timespec")

local function now_ns()
  C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local _M = {}

--- Run `fn` n/10 times to warm up, then time n calls one by one and print
-- `lua <name> calls=n median_ns=.. p99_ns=.. mean_ns=..`.
-- @tparam string name the case's name
-- @tparam number n how many calls to time
-- @tparam function fn the call
function _M.measure(name, n, fn)
  for _ = 1, n / 10 do fn() end
  local ns, total = {}, 0
  for i = 1, n do
    local t0 = now_ns()
    fn()
    local dt = now_ns() - t0
    ns[i] = dt
    total = total + dt
  end
  sort(ns)
  print(("lua   %-18s calls=%d median_ns=%d p99_ns=%d mean_ns=%d"):format(
    name, n, ns[floor(n / 2) + 1], ns[floor((n - 1) * 0.99) + 1], total / n))
end

return _M
