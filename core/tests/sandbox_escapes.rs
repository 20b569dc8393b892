//! Hostile scripts against the sandbox, one named case per attack (in the
//! style of Redis's "Try trick global protection 1").
//!
//! Every case runs through the public API only (`Config::from_yaml`,
//! `Engine::new`, `Engine::run_json`) on an engine with a pool of ONE VM, so
//! consecutive calls of a case (and the health check after it) run on the
//! same VM, or on its replacement when the pool discarded it. Limits are
//! `timeout_ms: 50`, `memory_mb: 8`. For every case the suite checks:
//!
//! 1. the outcome: an error kind (`timeout`, `memory`, `script_error`,
//!    `bad_output`) or an exact harmless result;
//! 2. that every call came back within 2x the time limit (ADR 002);
//! 3. that the engine then answers a normal script correctly (the process
//!    keeps serving), and that a VM which hit a limit was discarded.
//!
//! Cases that may take the whole process down (C-stack exhaustion) or hang a
//! thread forever run in a child process (this test binary re-executed with
//! `isolated_case_child`), so one crash or hang is reported as a failed case
//! instead of killing the suite. Everything else runs in this process, each
//! case on its own thread with a 10 s guard.
//!
//! The markdown report (name | what it tries | outcome | elapsed ms) is
//! printed to stdout: `cargo test -p llmproxy-core --test sandbox_escapes --
//! --nocapture`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llmproxy_core::sandbox::allowlist::FORBIDDEN;
use llmproxy_core::{Config, Engine, ErrorKind, HookName};
use serde_json::{json, Value};

/// Per-call time limit of every case.
const TIMEOUT_MS: u64 = 50;
/// Per-call memory allowance of every case.
const MEMORY_MB: u64 = 8;
/// Every call must come back within this (2x the limit, ADR 002).
const BOUND_MS: f64 = 2.0 * TIMEOUT_MS as f64;
/// A case still running after this is reported as hung.
const HANG_GUARD: Duration = Duration::from_secs(10);
/// Environment variable naming the case a child process runs.
const CHILD_ENV: &str = "LLMPROXY_SANDBOX_ESCAPES_CASE";
/// Marker of the child's outcome line on stdout.
const CHILD_MARK: &str = "@@SANDBOX_ESCAPES_OUTCOME@@";

/// The in-process case runner and the RSS tests must not overlap: RSS is
/// per process.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------
// Case model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Escape,
    Leak,
    Loop,
    Memory,
    Pattern,
    Recursion,
    CStack,
    Output,
    Errors,
    Helpers,
}

impl Group {
    const ALL: [Group; 10] = [
        Group::Escape,
        Group::Leak,
        Group::Loop,
        Group::Memory,
        Group::Pattern,
        Group::Recursion,
        Group::CStack,
        Group::Output,
        Group::Errors,
        Group::Helpers,
    ];

    fn title(self) -> &'static str {
        match self {
            Group::Escape => "Sandbox escapes",
            Group::Leak => "Cross-call leakage (pool of one VM, two calls)",
            Group::Loop => "Loops (timeout_ms 50)",
            Group::Memory => "Memory bombs (memory_mb 8; timeout_ms 1000, so that only the memory limit can stop them)",
            Group::Pattern => "Pattern bombs",
            Group::Recursion => "Deep recursion",
            Group::CStack => "C-stack exhaustion (each in a child process)",
            Group::Output => "Bad outputs",
            Group::Errors => "Error values",
            Group::Helpers => "Hostile helper arguments (library tables, foreign metatables, huge inputs)",
        }
    }
}

#[derive(Debug, Clone)]
enum Expect {
    /// The call fails with this kind.
    Kind(ErrorKind),
    /// The call fails with one of these kinds (each is a safe outcome).
    AnyOf(Vec<ErrorKind>),
    /// The call succeeds with exactly this result.
    Value(Value),
    /// Anything but a crash, a hang or an `internal` error.
    Survives,
    /// `Engine::new` refuses the config (the script does not compile).
    Rejected,
}

impl Expect {
    fn describe(&self) -> String {
        match self {
            Expect::Kind(k) => k.as_str().to_owned(),
            Expect::AnyOf(ks) => ks.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" or "),
            Expect::Value(v) => format!("ok {v}"),
            Expect::Survives => String::from("any answer"),
            Expect::Rejected => String::from("config rejected"),
        }
    }

    fn limit_kind(&self) -> bool {
        match self {
            Expect::Kind(k) => matches!(k, ErrorKind::Timeout | ErrorKind::Memory),
            Expect::AnyOf(ks) => ks.iter().all(|k| matches!(k, ErrorKind::Timeout | ErrorKind::Memory)),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Step {
    input: Value,
    expect: Expect,
}

#[derive(Debug, Clone)]
struct Case {
    group: Group,
    name: String,
    tries: String,
    hook: HookName,
    script: String,
    steps: Vec<Step>,
    isolate: bool,
    /// A time limit of its own, for a case that only the stack may stop.
    timeout_ms: Option<u64>,
}

impl Case {
    fn new(
        group: Group,
        name: impl Into<String>,
        tries: impl Into<String>,
        script: impl Into<String>,
        expect: Expect,
    ) -> Case {
        Case {
            group,
            name: name.into(),
            tries: tries.into(),
            hook: HookName::Usage,
            script: script.into(),
            steps: vec![Step {
                input: json!({}),
                expect,
            }],
            isolate: false,
            timeout_ms: None,
        }
    }

    fn timeout_ms(mut self, ms: u64) -> Case {
        self.timeout_ms = Some(ms);
        self
    }

    fn hook(mut self, hook: HookName) -> Case {
        assert_ne!(hook, HEALTH_HOOK, "the health hook is reserved");
        self.hook = hook;
        self
    }

    fn input(mut self, input: Value) -> Case {
        for s in &mut self.steps {
            s.input = input.clone();
        }
        self
    }

    /// Two calls on the same VM: `phase = 1` then `phase = 2`.
    fn two_calls(mut self, first: Expect, second: Expect) -> Case {
        self.steps = vec![
            Step {
                input: json!({"phase": 1}),
                expect: first,
            },
            Step {
                input: json!({"phase": 2}),
                expect: second,
            },
        ];
        self
    }

    fn steps(mut self, steps: Vec<Step>) -> Case {
        self.steps = steps;
        self
    }

    fn isolated(mut self) -> Case {
        self.isolate = true;
        self
    }
}

fn kind(k: ErrorKind) -> Expect {
    Expect::Kind(k)
}

fn any_of(ks: &[ErrorKind]) -> Expect {
    Expect::AnyOf(ks.to_vec())
}

fn value(v: Value) -> Expect {
    Expect::Value(v)
}

use ErrorKind::{BadOutput, Memory, ScriptError, Timeout};

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    escapes(&mut v);
    leaks(&mut v);
    loops(&mut v);
    memory(&mut v);
    patterns(&mut v);
    recursion(&mut v);
    cstack(&mut v);
    outputs(&mut v);
    errors(&mut v);
    helpers(&mut v);
    v
}

fn escapes(v: &mut Vec<Case>) {
    use Group::Escape as G;
    for name in FORBIDDEN {
        v.push(Case::new(
            G,
            format!("Forbidden global '{name}' is absent"),
            format!("read `{name}` directly, through `_G` and with `rawget(_G, '{name}')`"),
            format!(r#"return {{a = type({name}), b = type(_G.{name}), c = type(rawget(_G, "{name}"))}}"#),
            value(json!({"a": "nil", "b": "nil", "c": "nil"})),
        ));
    }
    let e = |name: &str, tries: &str, script: &str, expect: Expect| Case::new(G, name, tries, script, expect);
    v.extend([
        e("Try getfenv to grab the real globals", "`getfenv(0)`", "return {g = getfenv(0)}", kind(ScriptError)),
        e("Try setfenv on a library function", "`setfenv(string.upper, {})`", "setfenv(string.upper, {})", kind(ScriptError)),
        e("Try runtime compilation with load", "`load('return 1')()`", "return {r = load('return 1')()}", kind(ScriptError)),
        e("Try runtime compilation with loadstring", "`loadstring('return 1')()`", "return {r = loadstring('return 1')()}", kind(ScriptError)),
        e(
            "Try a bytecode chunk through load",
            "`load` of a string starting with the LuaJIT bytecode header ESC 'LJ'",
            "local bc = string.char(27, 76, 74, 2, 10) .. 'xxxx' return {r = load(bc)}",
            kind(ScriptError),
        ),
        Case::new(
            G,
            "Try a bytecode chunk as the script itself",
            "configure a script whose source is LuaJIT bytecode (ESC 'LJ' header)",
            "\u{1b}LJ\u{2}\nreturn 1",
            Expect::Rejected,
        ),
        e("Try string.dump to get bytecode", "`string.dump(function() end)`", "return {d = string.dump(function() end)}", kind(ScriptError)),
        e(
            "Try string.dump through the string metatable",
            "`(\"\").dump` via the metatable of strings",
            r#"return {t = type(("").dump), u = type(("").upper)}"#,
            value(json!({"t": "nil", "u": "function"})),
        ),
        e("Try require('ffi')", "`require('ffi')`", "local ffi = require('ffi') return {t = type(ffi)}", kind(ScriptError)),
        e("Try io.open on /etc/passwd", "`io.open('/etc/passwd'):read('*a')`", "return {s = io.open('/etc/passwd'):read('*a')}", kind(ScriptError)),
        e("Try os.execute", "`os.execute('id')`", "return {r = os.execute('id')}", kind(ScriptError)),
        e("Try os.exit", "`os.exit(1)` to kill the gateway", "os.exit(1)", kind(ScriptError)),
        e(
            "Try the rest of os",
            "look for os.execute/exit/getenv/remove/rename/tmpname/setlocale",
            r#"local r = {}
for _, k in ipairs({"execute", "exit", "getenv", "remove", "rename", "tmpname", "setlocale"}) do
  if os[k] ~= nil then r[#r + 1] = k end
end
return {present = table.concat(r, ","), time = type(os.time), clock = type(os.clock), date = type(os.date)}"#,
            value(json!({"present": "", "time": "function", "clock": "function", "date": "function"})),
        ),
        e("Try debug.getregistry", "`debug.getregistry()`", "return {r = debug.getregistry()}", kind(ScriptError)),
        e("Try jit.on to defeat the time limit", "`jit.on()` then a hot loop", "jit.on() for i = 1, 1e9 do end", kind(ScriptError)),
        e("Try ffi.C", "`ffi.cdef` + `ffi.C.getpid()`", "ffi.cdef('int getpid(void);') return {p = ffi.C.getpid()}", kind(ScriptError)),
        e("Try package.loaded", "`package.loaded.io`", "return {t = type(package.loaded.io)}", kind(ScriptError)),
        // Where the JIT compiler is on, views read numbers, booleans and
        // objects through LuaJIT's FFI (`convert/lazy/fast_field.rs`): no
        // C data, nor the FFI itself, may reach a script that way.
        e(
            "Try catching C data from a view's fields",
            "read a number, a boolean, an object, a string, null and an absent field of `request.body`, twice, and the view's metatable",
            r#"local b = request.body
local r = {}
for _ = 1, 2 do
  for _, k in ipairs({"n", "b", "o", "s", "z", "absent"}) do r[#r + 1] = type(b[k]) end
end
return {types = table.concat(r, ","), n = b.n + 1, mt = type(getmetatable(b)), ffi = type(ffi)}"#,
            value(json!({
                "types": "number,boolean,table,string,userdata,nil,number,boolean,table,string,userdata,nil",
                "n": 4, "mt": "nil", "ffi": "nil"
            })),
        )
        .input(json!({"request": {"id": "r1", "body": {"n": 3, "b": true, "o": {"x": 1}, "s": "str", "z": null}}})),
        e(
            "Try a coroutine to escape the hook",
            "`coroutine.wrap` around an endless loop",
            "coroutine.wrap(function() while true do end end)()",
            kind(ScriptError),
        ),
        e("Try newproxy for a __gc userdata", "`newproxy(true)`", "local p = newproxy(true) return {t = type(p)}", kind(ScriptError)),
        e("Try rawset on a library", "`rawset(string, 'upper', print)`", "rawset(string, 'upper', print)", kind(ScriptError)),
        e(
            "Try reaching the raw globals through a function's environment",
            "ask for the environment of the prelude's `pcall` and of `string.find`",
            r#"local get = getfenv or (debug and debug.getfenv)
if get then return {leak = type(get(pcall)), leak2 = type(get(string.find))} end
return {leak = "none", attempt = pcall(function() return getfenv(pcall) end)}"#,
            value(json!({"leak": "none", "attempt": false})),
        ),
        e(
            "Try tampering with getmetatable('')",
            "`getmetatable('').__index = {upper = ...}`",
            "local mt = getmetatable('') mt.__index = {upper = function() return 'pwned' end}",
            kind(ScriptError),
        ),
        e(
            "Try reading getmetatable('')",
            "`getmetatable('')` to find the real string table",
            "return {mt = getmetatable('')}",
            value(json!({"mt": false})),
        ),
        e(
            "Try setmetatable on a string",
            "`setmetatable('', {})` to replace string methods",
            "setmetatable('', {__index = {upper = function() return 'pwned' end}})",
            kind(ScriptError),
        ),
        e("Try string.upper = nil", "remove a library function", "string.upper = nil", kind(ScriptError)),
        e("Try string.x = 1", "add a field to a library", "string.x = 1", kind(ScriptError)),
        e("Try table.insert = ...", "replace a library function", "table.insert = function() end", kind(ScriptError)),
        e("Try json.encode = nil", "remove a helper function", "json.encode = nil", kind(ScriptError)),
        e("Try json.null = 1", "overwrite the null sentinel", "json.null = 1", kind(ScriptError)),
        e(
            "Try shadowing string through _G",
            "`_G.string = {...}`: allowed, but only for this call (see the leak cases)",
            "_G.string = {upper = function() return 'pwned' end} return {s = string.upper('a'), t = type(_G)}",
            value(json!({"s": "pwned", "t": "table"})),
        ),
        e(
            "Try writing a global through _G",
            "`_G.x = 1` then read `x`: call-local",
            "_G.x = 1 return {x = x, same = rawequal(_G, _G._G)}",
            value(json!({"x": 1, "same": true})),
        ),
        e(
            "Try setmetatable(_G, ...)",
            "replace the environment's metatable to redirect lookups",
            "setmetatable(_G, {__index = function() return 1 end})",
            kind(ScriptError),
        ),
        e("Try getmetatable(_G)", "read the environment's metatable to reach the base", "return {mt = getmetatable(_G)}", value(json!({"mt": false}))),
        e(
            "Try getmetatable on library proxies",
            "getmetatable of string, table, math, os, json, log",
            "return {s = getmetatable(string), t = getmetatable(table), m = getmetatable(math), o = getmetatable(os), j = getmetatable(json), l = getmetatable(log)}",
            value(json!({"s": false, "t": false, "m": false, "o": false, "j": false, "l": false})),
        ),
        e(
            "Try setmetatable on a library proxy",
            "`setmetatable(string, nil)` to unwrap the proxy",
            "setmetatable(string, nil)",
            kind(ScriptError),
        ),
        e(
            "Try rawget tricks",
            "rawget on a proxy and on `_G` to find hidden fields",
            "return {up = type(rawget(string, 'upper')), dump = type(rawget(string, 'dump')), g = type(rawget(_G, 'string')), io = type(rawget(_G, 'io'))}",
            value(json!({"up": "function", "dump": "nil", "g": "nil", "io": "nil"})),
        ),
        e(
            "Try pairs over string to obtain the real table",
            "iterate `pairs(string)`, keep its state value, write through it",
            r#"local n, other = 0, 0
for k, val in pairs(string) do n = n + 1 if type(val) ~= "function" then other = other + 1 end end
local f, s = pairs(string)
local ok = pcall(function() s.upper = nil end)
return {n = n, other = other, state_is_proxy = rawequal(s, string), write_ok = ok, upper = string.upper("a")}"#,
            value(json!({"n": 13, "other": 0, "state_is_proxy": true, "write_ok": false, "upper": "A"})),
        ),
        e(
            "Try next over string",
            "`next(string)` to walk the real table",
            "local k, val = next(string) return {k = type(k), v = type(val)}",
            value(json!({"k": "string", "v": "function"})),
        ),
        e(
            "Try pairs(_G) to list the base",
            "the environment holds only this call's globals",
            "local ks = {} for k in pairs(_G) do ks[#ks + 1] = k end table.sort(ks) return {keys = table.concat(ks, ',')}",
            value(json!({"keys": "_G"})),
        ),
        e("Try a metatable on json.null", "`setmetatable(json.null, {})`", "setmetatable(json.null, {})", kind(ScriptError)),
        e(
            "Try stripping the lazy body's metatable",
            "`setmetatable(request.body, nil)` to reach the lazy loader: the body becomes a plain table first",
            "setmetatable(request.body, nil) return {model = request.body.model, mt = getmetatable(request.body) or 'none'}",
            value(json!({"model": "gpt-4", "mt": "none"})),
        )
        .input(json!({"request": {"id": "r1", "body": {"model": "gpt-4"}}})),
        e(
            "Try the metatable of an error userdata",
            "get a Rust error userdata from pcall and read its metatable",
            "local ok, err = pcall(string.rep, 'x', -1, {}) return {t = type(err), mt = getmetatable(err)}",
            value(json!({"t": "userdata", "mt": false})),
        ),
        e("Try collectgarbage('stop')", "turn the GC off", "collectgarbage('stop')", kind(ScriptError)),
        e(
            "Try a __gc finalizer on a table",
            "a table finalizer with an endless loop, then churn the GC",
            "setmetatable({}, {__gc = function() while true do end end}) for i = 1, 2e5 do local x = {i} end return {ok = true}",
            value(json!({"ok": true})),
        ),
    ]);
}

fn leaks(v: &mut Vec<Case>) {
    use Group::Leak as G;
    let done = || value(json!({"done": 1}));
    v.extend([
        Case::new(
            G,
            "Leak a global from call 1 to call 2",
            "call 1 writes `LEAK = 'secret'`, call 2 reads it",
            "if phase == 1 then LEAK = 'secret' return {done = 1} end return {seen = tostring(LEAK)}",
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "nil"}))),
        Case::new(
            G,
            "Leak a library mutation from call 1 to call 2",
            "call 1 tries to replace `string.upper`, `table.insert`, `math.floor`; call 2 uses them",
            r#"if phase == 1 then
  pcall(function() string.upper = function() return "pwned" end end)
  pcall(function() table.insert = nil end)
  pcall(function() math.floor = nil end)
  return {done = 1}
end
local t = {} table.insert(t, 1)
return {seen = string.upper("a") .. #t .. math.floor(1.5)}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "A11"}))),
        Case::new(
            G,
            "Leak a json.null mutation from call 1 to call 2",
            "call 1 tries to overwrite `json.null` and `json.encode`; call 2 encodes a null",
            r#"if phase == 1 then
  local a = pcall(function() json.null = 1 end)
  local b = pcall(function() json.encode = function() return "pwned" end end)
  return {done = 1}
end
return {seen = json.encode({a = json.null}), t = type(json.null)}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "{\"a\":null}", "t": "userdata"}))),
        Case::new(
            G,
            "Leak a value stored into _G from call 1 to call 2",
            "call 1 stores `_G.LEAK`, shadows `_G.string`, removes `_G._G`; call 2 looks",
            r#"if phase == 1 then
  _G.LEAK = {secret = "s3cret"}
  _G.string = {upper = function() return "pwned" end}
  _G._G = nil
  return {done = 1}
end
return {seen = tostring(LEAK) .. "," .. string.upper("a") .. "," .. type(_G)}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "nil,A,table"}))),
        Case::new(
            G,
            "Leak many globals from call 1 to call 2",
            "call 1 writes 300 globals (more than an environment keeps when it is reused); call 2 counts them",
            r#"if phase == 1 then for i = 1, 300 do _G["g" .. i] = i end return {done = 1} end
local n = 0 for i = 1, 300 do if _G["g" .. i] then n = n + 1 end end
return {seen = n}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": 0}))),
        Case::new(
            G,
            "Leak a replaced pcall from call 1 to call 2",
            "call 1 sets `pcall`/`error`/`type` globals; call 2 uses them",
            r#"if phase == 1 then
  pcall = function() return true end
  error = function() end
  type = function() return "pwned" end
  return {done = 1}
end
return {seen = tostring((pcall(error, "e"))) .. "," .. type(1)}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "false,number"}))),
        Case::new(
            G,
            "Leak through the string metatable from call 1 to call 2",
            "call 1 tries every way to change string methods; call 2 calls `(\"a\"):upper()`",
            r#"if phase == 1 then
  pcall(function() getmetatable("").__index.upper = function() return "pwned" end end)
  pcall(function() setmetatable("", {__index = {upper = function() return "pwned" end}}) end)
  pcall(function() ("").upper = nil end)
  return {done = 1}
end
return {seen = ("a"):upper() .. ("b"):rep(2)}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "Abb"}))),
        Case::new(
            G,
            "Leak a host global from call 1 to call 2",
            "call 1 gets six globals from its host besides `phase` (more than the environment removes by name); call 2, given none, looks for them",
            r#"if phase == 1 then return {done = 1} end
local n = 0 for i = 1, 6 do if _G["g" .. i] ~= nil then n = n + 1 end end
return {seen = n}"#,
            Expect::Survives,
        )
        .steps(vec![
            Step {
                input: json!({"phase": 1, "g1": 1, "g2": "two", "g3": {"x": 3}, "g4": [4], "g5": true, "g6": 6}),
                expect: done(),
            },
            Step {
                input: json!({"phase": 2}),
                expect: value(json!({"seen": 0})),
            },
        ]),
        Case::new(
            G,
            "Leak a request-body edit from call 1 to call 2",
            "call 1 edits `request.body`; call 2 (another request) reads its own body",
            r#"if phase == 1 then request.body.model = "evil" request.body.injected = true return {done = 1} end
return {seen = request.body.model .. "," .. tostring(request.body.injected)}"#,
            Expect::Survives,
        )
        .steps(vec![
            Step {
                input: json!({"phase": 1, "request": {"id": "r1", "body": {"model": "gpt-4"}}}),
                expect: done(),
            },
            Step {
                input: json!({"phase": 2, "request": {"id": "r2", "body": {"model": "gpt-3.5"}}}),
                expect: value(json!({"seen": "gpt-3.5,nil"})),
            },
        ]),
        Case::new(
            G,
            "Leak a request field read in call 1 into call 2",
            "call 1 reads `request.user_id`, `request.headers` and the body (the views are re-armed for the next call); call 2, another caller's request without them, reads the same",
            r#"if phase == 1 then local _ = request.user_id .. request.headers["X-Key"] .. request.body.model return {done = 1} end
return {seen = tostring(request.user_id) .. "," .. tostring(request.headers["x-key"]) .. "," .. tostring(request.body.model) .. "," .. request.id}"#,
            Expect::Survives,
        )
        .steps(vec![
            Step {
                input: json!({"phase": 1, "request": {"id": "r1", "user_id": "alice", "headers": {"X-Key": "sk-alice"}, "body": {"model": "gpt-4"}}}),
                expect: done(),
            },
            Step {
                input: json!({"phase": 2, "request": {"id": "r2", "body": {}}}),
                expect: value(json!({"seen": "nil,nil,nil,r2"})),
            },
        ]),
        Case::new(
            G,
            "Leak a value put into a request view with table.insert",
            "call 1 reads `request.body.metadata.user` and writes into `request`, `request.body` and `metadata` with `table.insert` (a raw write, no `__newindex`); call 2 (the views re-armed) reads the same",
            r#"if phase == 1 then
  local _ = request.body.metadata.user
  table.insert(request, "leaked")
  table.insert(request.body, "leaked")
  table.insert(request.body.metadata, "leaked")
  return {done = 1}
end
return {seen = tostring(request[1]) .. "," .. tostring(request.body[1]) .. "," .. tostring(request.body.metadata[1]) .. "," .. tostring(request.body.metadata.team) .. "," .. tostring(request.body.metadata.user)}"#,
            Expect::Survives,
        )
        .steps(vec![
            Step {
                input: json!({"phase": 1, "request": {"id": "r1", "body": {"model": "gpt-4", "metadata": {"team": "a", "user": "alice"}}}}),
                expect: done(),
            },
            Step {
                input: json!({"phase": 2, "request": {"id": "r2", "body": {"metadata": {"team": "b"}}}}),
                expect: value(json!({"seen": "nil,nil,nil,b,nil"})),
            },
        ]),
        Case::new(
            G,
            "Leak a closure over call 1's environment",
            "call 1 hides a closure in every reachable shared place; call 2 looks for it",
            r#"if phase == 1 then
  local secret = "s3cret"
  local f = function() return secret end
  pcall(function() string.leak = f end)
  pcall(function() getmetatable("").leak = f end)
  pcall(function() json.leak = f end)
  pcall(function() setmetatable(_G, {__index = {leak = f}}) end)
  return {done = 1}
end
return {seen = tostring(string.leak) .. "," .. tostring(json.leak) .. "," .. tostring(leak)}"#,
            Expect::Survives,
        )
        .two_calls(done(), value(json!({"seen": "nil,nil,nil"}))),
        Case::new(
            G,
            "Brick the VM with 40,000 live gmatch iterators",
            "call 1 keeps 40,000 `string.gmatch` iterators alive; call 2 (and every later call) must still run",
            r#"if phase == 1 then
  local its = {}
  for i = 1, 40000 do its[i] = string.gmatch("a", ".") end
  return {n = #its}
end
return {seen = (string.gsub("ok", "x", "y"))}"#,
            Expect::Survives,
        )
        .two_calls(Expect::Survives, value(json!({"seen": "ok"}))),
    ]);
}

fn loops(v: &mut Vec<Case>) {
    use Group::Loop as G;
    let t = || kind(Timeout);
    v.extend([
        Case::new(G, "Spin in while true do end", "the classic endless loop", "while true do end", t()),
        Case::new(G, "Spin in for i = 1, 1e12", "a numeric loop that ends in hours", "for i = 1, 1e12 do end", t()),
        Case::new(G, "Spin in repeat until false", "endless repeat loop", "repeat until false", t()),
        Case::new(G, "Spin in tail-call recursion", "proper tail calls never overflow the stack", "local function f(n) return f(n + 1) end return f(1)", t()),
        Case::new(
            G,
            "Spin in an __index metamethod",
            "loop inside a metamethod the VM calls",
            "local t = setmetatable({}, {__index = function() while true do end end}) return {x = t.x}",
            t(),
        ),
        Case::new(
            G,
            "Spin in __tostring via tostring()",
            "loop inside `__tostring` called from the `tostring` builtin",
            "local x = setmetatable({}, {__tostring = function() while true do end end}) return {s = tostring(x)}",
            t(),
        ),
        Case::new(
            G,
            "Spin in __tostring via print(), then return normally",
            "`print` (a Rust callback) calls a looping `__tostring`; the script then returns a value",
            "local x = setmetatable({}, {__tostring = function() while true do end end}) print(x) return {s = 'finished'}",
            t(),
        ),
        Case::new(G, "Spin inside pcall", "`pcall(function() while true do end end)`", "local ok = pcall(function() while true do end end) return {ok = ok}", t()),
        Case::new(
            G,
            "Catch the timeout with pcall in a loop",
            "`for ... do pcall(spin) end` to swallow each timeout",
            "for i = 1, 1e9 do pcall(function() while true do end end) end return {survived = true}",
            t(),
        ),
        Case::new(
            G,
            "Catch the timeout with xpcall and a looping handler",
            "the message handler spins forever after the timeout fired",
            "xpcall(function() while true do end end, function(e) while true do end end) return {survived = true}",
            t(),
        )
        .isolated(),
        Case::new(
            G,
            "Catch the timeout with xpcall and a slow handler",
            "the message handler runs a long (finite) loop after the timeout fired",
            "xpcall(function() while true do end end, function(e) for i = 1, 3e8 do end return e end) return {survived = true}",
            t(),
        )
        .isolated(),
        Case::new(
            G,
            "Spin in an xpcall handler after an ordinary error",
            "`xpcall(error, spin)`",
            "xpcall(error, function() while true do end end) return {survived = true}",
            t(),
        ),
        Case::new(
            G,
            "Spin in a table.sort comparator",
            "loop inside a Lua callback of a C function",
            "local t = {} for i = 1, 100 do t[i] = i end table.sort(t, function(a, b) while true do end end)",
            t(),
        ),
        Case::new(
            G,
            "Spin in a gsub replacement function",
            "loop inside a Lua callback of the Rust pattern port",
            "string.gsub('aaaa', 'a', function() while true do end end)",
            t(),
        ),
        Case::new(
            G,
            "Spin in a __concat metamethod",
            "loop inside `..` on a table",
            "local t = setmetatable({}, {__concat = function() while true do end end}) return {s = t .. 'x'}",
            t(),
        ),
        Case::new(
            G,
            "Spin in a loop the JIT compiler has compiled",
            "warm a function up until LuaJIT compiles its loop, then call it with a bound that never ends",
            "local function work(n) local s = 0 for i = 1, n do s = s + i % 7 end return s end \
             for _ = 1, 300 do work(100) end return {s = work(1e15)}",
            t(),
        ),
        Case::new(
            G,
            "Spin with string work in a compiled loop",
            "string functions LuaJIT compiles inline (`sub`, `byte`, `..`) in an endless loop",
            "local s = 'abcdef' while true do s = s:sub(2, 4) .. s:byte(1) .. 'x' end",
            t(),
        ),
        Case::new(
            G,
            "Shadow pcall and error, then spin",
            "replace the globals the limits might rely on",
            "pcall = function() return true end error = function() end while true do end",
            t(),
        ),
    ]);
}

fn memory(v: &mut Vec<Case>) {
    use Group::Memory as G;
    let m = || kind(Memory);
    v.extend([
        Case::new(G, "Allocate string.rep('x', 1e9)", "a 1 GB string in one C call", "return {n = #string.rep('x', 1e9)}", m()),
        Case::new(
            G,
            "Spin string.rep('', 1e15)",
            "an empty result that LuaJIT's rep would loop 10^15 times for",
            "return {n = #string.rep('', 1e15)}",
            value(json!({"n": 0})),
        ),
        Case::new(G, "Allocate string.rep('ab', 1e8, ',')", "300 MB through the separator form", "return {n = #string.rep('ab', 1e8, ',')}", m()),
        Case::new(G, "Allocate ('x'):rep(1e9) as a method", "the same bomb through the string metatable", "return {n = #('x'):rep(1e9)}", m()),
        Case::new(G, "Allocate string.rep('x', 1/0)", "an infinite count", "return {n = #string.rep('x', 1/0)}", m()),
        Case::new(G, "Spin string.rep('x', 0/0)", "a NaN count", "return {n = #string.rep('x', 0/0)}", value(json!({"n": 0}))),
        Case::new(G, "Grow a table without bound", "`local t = {} while true do t[#t+1] = {} end`", "local t = {} while true do t[#t + 1] = {} end", m()),
        Case::new(G, "Double a string until it breaks", "`s = s .. s` in a loop", "local s = 'x' while true do s = s .. s end", m()),
        Case::new(
            G,
            "Concatenate a huge table",
            "`table.concat` of 64 references to one 1 MB string (64 MB result)",
            "local s = string.rep('x', 2^20) local t = {} for i = 1, 64 do t[i] = s end return {n = #table.concat(t)}",
            m(),
        ),
        Case::new(
            G,
            "Catch the memory error with pcall and retry",
            "swallow the out-of-memory error and allocate again, 100 times",
            "for i = 1, 100 do pcall(function() local t = {} while true do t[#t + 1] = {} end end) end return {survived = true}",
            m(),
        ),
        Case::new(
            G,
            "Catch the string.rep guard with pcall and retry",
            "swallow the rep guard's error 1000 times",
            "for i = 1, 1000 do pcall(string.rep, 'x', 1e9) end return {survived = true}",
            m(),
        ),
        Case::new(
            G,
            "Catch the memory error with xpcall and allocate in the handler",
            "the handler allocates 1e6 entries after the limit was hit",
            "xpcall(function() local t = {} while true do t[#t + 1] = {} end end, function(e) local t = {} for i = 1, 1e6 do t[i] = i end return e end) return {survived = true}",
            m(),
        ),
        Case::new(
            G,
            "Split a 5 MB string into 5 million parts",
            "a Rust helper that builds a huge table",
            "local r = string_utils.split(string.rep(',', 5e6), ',') return {n = #r}",
            m(),
        ),
        Case::new(
            G,
            "Amplify with gsub",
            "2,000 matches each replaced by 50,000 bytes (100 MB output built by the Rust pattern port)",
            "local s = string.gsub(string.rep('x', 2000), 'x', string.rep('y', 50000)) return {n = #s}",
            // Either limit is a safe answer here; the RSS test below checks
            // what the process allocated meanwhile.
            any_of(&[Memory, Timeout]),
        ),
        Case::new(
            G,
            "Encode 64 references to one 1 MB string",
            "`json.encode` output far larger than its input",
            "local s = string.rep('x', 2^20) local t = {} for i = 1, 64 do t[i] = s end return {n = #json.encode(t)}",
            kind(ScriptError),
        ),
        Case::new(G, "Unpack 10 million results", "`unpack({}, 1, 1e7)` onto the Lua stack", "return {n = select('#', unpack({}, 1, 1e7))}", kind(ScriptError)),
        Case::new(
            G,
            "Decode 100,000 nested arrays",
            "a JSON parser recursion bomb through `json.decode`",
            "return {d = json.decode(string.rep('[', 1e5))}",
            kind(ScriptError),
        ),
        Case::new(
            G,
            "Decode a million empty arrays",
            "3 MB of JSON text that becomes far more Lua tables than the limit allows (built on the Lua stack)",
            "local t = json.decode(string.format('[%s0]', string.rep('[],', 1e6))) return {n = #t}",
            kind(Memory),
        ),
    ]);
}

fn patterns(v: &mut Vec<Case>) {
    use Group::Pattern as G;
    let t = || kind(Timeout);
    v.extend([
        Case::new(
            G,
            "Backtrack in string.find",
            "`string.find(('a'):rep(30000), '.-.-.-.-.-b')`",
            "return {r = string.find(string.rep('a', 30000), '.-.-.-.-.-b')}",
            t(),
        ),
        Case::new(
            G,
            "Backtrack in string.match",
            "the same bomb through `match`",
            "return {r = string.match(string.rep('a', 30000), '.-.-.-.-.-b')}",
            t(),
        ),
        Case::new(
            G,
            "Backtrack in string.gsub",
            "the same bomb through `gsub`",
            "return {r = (string.gsub(string.rep('a', 30000), '.-.-.-.-.-b', 'x'))}",
            t(),
        ),
        Case::new(
            G,
            "Backtrack in string.gmatch",
            "the same bomb through `gmatch`",
            "for m in string.gmatch(string.rep('a', 30000), '.-.-.-.-.-b') do end return {r = 1}",
            t(),
        ),
        Case::new(
            G,
            "Backtrack in a method call",
            "`s:find(bomb)` through the string metatable",
            "local s = ('a'):rep(30000) return {r = s:find('.-.-.-.-.-b')}",
            t(),
        ),
        Case::new(
            G,
            "Backtrack exponentially with a?^n a^n",
            "the classic exponential pattern, n = 30",
            "return {r = string.match(string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30)) ~= nil}",
            t(),
        ),
        Case::new(
            G,
            "Recurse 300 levels in the matcher",
            "`string.rep('a?', 300)`: one matcher recursion per item",
            "return {r = string.match(string.rep('a', 300), string.rep('a?', 300) .. 'b')}",
            kind(ScriptError),
        ),
        Case::new(
            G,
            "Open 40 captures",
            "more captures than the matcher holds",
            "return {r = string.find('x', string.rep('()', 40))}",
            kind(ScriptError),
        ),
        Case::new(
            G,
            "Plain find on 1 MB",
            "a long plain search (linear time)",
            "return {r = string.find(string.rep('a', 1e6), string.rep('a', 1000) .. 'b', 1, true) == nil}",
            value(json!({"r": true})),
        ),
    ]);
}

fn recursion(v: &mut Vec<Case>) {
    use Group::Recursion as G;
    let se = || kind(ScriptError);
    v.extend([
        Case::new(G, "Recurse without a tail call", "`local function f() return 1 + f() end f()`", "local function f() return 1 + f() end f()", se()),
        Case::new(
            G,
            "Recurse through __index",
            "`__index` that indexes itself",
            "local t = setmetatable({}, {__index = function(t, k) return t[k] end}) return {x = t.x}",
            se(),
        ),
        Case::new(
            G,
            "Recurse through __call",
            "a callable table that calls itself",
            "local t = setmetatable({}, {__call = function(self) return 1 + self() end}) return {x = t()}",
            se(),
        ),
        Case::new(
            G,
            "Recurse through __concat",
            "`__concat` that concatenates itself",
            "local t = setmetatable({}, {__concat = function(a, b) return a .. b end}) return {x = t .. 'a'}",
            se(),
        ),
        Case::new(
            G,
            "Recurse through __eq",
            "`__eq` that compares itself",
            "local mt = {__eq = function(a, b) return a == b end} local a, b = setmetatable({}, mt), setmetatable({}, mt) return {x = a == b}",
            se(),
        ),
        Case::new(
            G,
            "Nest 300 table constructors in the source",
            "a parser nesting bomb as the script",
            format!("return {}{}", "{".repeat(300), "}".repeat(300)),
            Expect::Rejected,
        ),
    ]);
}

fn cstack(v: &mut Vec<Case>) {
    use Group::CStack as G;
    let bounded = || any_of(&[ScriptError, Timeout]);
    v.extend([
        Case::new(
            G,
            "Nest pcall until the stack ends",
            "`local function f() return pcall(f) end`",
            "local d = 0 local function f() d = d + 1 return pcall(f) end f() return {deep = d > 100}",
            value(json!({"deep": true})),
        )
        // ~40 ms in a debug build: the stack, not the clock, must end it.
        .timeout_ms(1000),
        Case::new(
            G,
            "Nest xpcall until the stack ends",
            "`local function f() return xpcall(f, handler) end`",
            "local d = 0 local function f() d = d + 1 return xpcall(f, function(e) return e end) end f() return {deep = d > 100}",
            value(json!({"deep": true})),
        ),
        Case::new(
            G,
            "Recurse tostring -> __tostring -> tostring",
            "C recursion through the `tostring` builtin",
            "local mt = {} mt.__tostring = function(s) return tostring(s) end return {s = tostring(setmetatable({}, mt))}",
            bounded(),
        ),
        Case::new(
            G,
            "Recurse string.format -> __tostring -> string.format",
            "C recursion through LuaJIT's `string.format('%s')`",
            "local function f() return string.format('%s', setmetatable({}, {__tostring = f})) end return {x = f()}",
            bounded(),
        ),
        Case::new(
            G,
            "Recurse gsub -> replacement function -> gsub",
            "Rust recursion through the pattern port's callback",
            "local function f(s) return (string.gsub(s, '.', f)) end return {r = f('a')}",
            bounded(),
        ),
        Case::new(
            G,
            "Recurse gmatch inside a gmatch loop",
            "nested Rust iterators",
            "local function f(s) for w in string.gmatch(s, '.') do f(w) end end f('a')",
            bounded(),
        ),
        Case::new(
            G,
            "Recurse table.sort -> comparator -> table.sort",
            "C recursion through `table.sort`",
            "local function cmp(a, b) table.sort({3, 2, 1}, cmp) return a < b end table.sort({3, 2, 1}, cmp)",
            bounded(),
        ),
        Case::new(
            G,
            "Recurse print -> __tostring -> print",
            "Rust recursion through the `print` callback",
            "local x = setmetatable({}, {}) getmetatable(x).__tostring = function(s) print(s) return 'x' end print(x) return {ok = true}",
            Expect::Survives,
        ),
        Case::new(
            G,
            "Recurse log.info -> __tostring -> log.info",
            "Rust recursion through the `log` helper",
            "local x x = setmetatable({}, {__tostring = function(s) log.info(s) return 'x' end}) log.info(x) return {ok = true}",
            Expect::Survives,
        ),
        Case::new(
            G,
            "Recurse json.encode -> __index -> json.encode",
            "a metamethod the encoder might call",
            "local function f() return json.encode(setmetatable({}, {__index = function() return f() end})) end return {x = f()}",
            value(json!({"x": "{}"})),
        ),
    ]);
    for c in v.iter_mut().filter(|c| c.group == G) {
        c.isolate = true;
    }
}

fn outputs(v: &mut Vec<Case>) {
    use Group::Output as G;
    let bo = || kind(BadOutput);
    let backends = json!({"backends": {"a": {"url": "http://a"}, "b": {"url": "http://b"}}});
    let o = |name: &str, tries: &str, script: &str| Case::new(G, name, tries, script, bo());
    v.extend([
        o("Route to a number", "routing returns `42`", "return 42")
            .hook(HookName::Routing)
            .input(backends.clone()),
        o(
            "Route to an unknown backend",
            "routing returns `'evil'`",
            "return 'evil'",
        )
        .hook(HookName::Routing)
        .input(backends.clone()),
        o("Route to a function", "routing returns `print`", "return print")
            .hook(HookName::Routing)
            .input(backends.clone()),
        o("Route to a table", "routing returns `{'a'}`", "return {'a'}")
            .hook(HookName::Routing)
            .input(backends.clone()),
        o(
            "Allow with allow = 'yes'",
            "auth returns `{allow = \"yes\"}`",
            "return {allow = 'yes'}",
        )
        .hook(HookName::Auth),
        Case::new(
            G,
            "Allow with an extra field",
            "auth returns `{allow = true, admin = true}`: the field auth does not use is dropped, not obeyed",
            "return {allow = true, admin = true}",
            value(json!({"allow": true})),
        )
        .hook(HookName::Auth),
        o(
            "Inject a header with CR/LF",
            "request_transform sets `X-A = 'v\\r\\nSet-Cookie: x'`",
            "return {headers = {['X-A'] = 'v\\r\\nSet-Cookie: pwned=1'}}",
        )
        .hook(HookName::RequestTransform),
        o(
            "Inject a header through its name",
            "request_transform uses `'X-A: 1\\r\\nX-B'` as a header name",
            "return {headers = {['X-A: 1\\r\\nX-B'] = 'v'}}",
        )
        .hook(HookName::RequestTransform),
        o(
            "Put a NUL in a header value",
            "response_transform sets `'a\\0b'`",
            "return {headers = {['X-A'] = 'a\\0b'}}",
        )
        .hook(HookName::ResponseTransform),
        o(
            "Answer with status_code 99",
            "response_transform returns status 99",
            "return {status_code = 99}",
        )
        .hook(HookName::ResponseTransform),
        o(
            "Answer with status_code 600",
            "error_handler returns status 600",
            "return {status_code = 600, body = {}}",
        )
        .hook(HookName::ErrorHandler),
        o(
            "Answer with status_code 200.5",
            "response_transform returns a fractional status",
            "return {status_code = 200.5}",
        )
        .hook(HookName::ResponseTransform),
        o(
            "Switch protocols with status_code 101",
            "response_transform returns status 101 (a final answer must be 200-599)",
            "return {status_code = 101}",
        )
        .hook(HookName::ResponseTransform),
        o(
            "Answer an error with status_code 103",
            "error_handler returns status 103 (Early Hints) as the final answer",
            "return {status_code = 103, body = {}}",
        )
        .hook(HookName::ErrorHandler),
        o(
            "Deny auth with status_code 100",
            "auth denies with status 100 Continue",
            "return {allow = false, status_code = 100}",
        )
        .hook(HookName::Auth),
        Case::new(
            G,
            "Set the Upgrade header",
            "response_transform sets `Upgrade = 'websocket'` (hop-by-hop: dropped with a warning)",
            "return {headers = {Upgrade = 'websocket', ['X-A'] = '1'}}",
            value(json!({"headers": {"X-A": "1"}})),
        )
        .hook(HookName::ResponseTransform),
        Case::new(
            G,
            "Set Transfer-Encoding upstream",
            "request_transform sets `Transfer-Encoding = 'chunked'` to desync the upstream framing",
            "return {headers = {['Transfer-Encoding'] = 'chunked'}}",
            value(json!({"headers": {}})),
        )
        .hook(HookName::RequestTransform),
        Case::new(
            G,
            "Set Content-Length and Host upstream",
            "request_transform sets `Content-Length = '0'` (request smuggling by a short length) and `Host` (the host writes both)",
            "return {headers = {['Content-Length'] = '0', host = 'internal.example', ['X-A'] = '1'}}",
            value(json!({"headers": {"X-A": "1"}})),
        )
        .hook(HookName::RequestTransform),
        Case::new(
            G,
            "Set a Proxy-* header",
            "error_handler sets `Proxy-Authenticate` (hop-by-hop)",
            "return {body = {}, headers = {['proxy-authenticate'] = 'Basic'}}",
            value(json!({"body": {}, "headers": {}})),
        )
        .hook(HookName::ErrorHandler),
        Case::new(
            G,
            "Set TE, Trailer, Keep-Alive and Connection",
            "request_transform sets every other hop-by-hop header",
            "return {headers = {TE = 'trailers', Trailer = 'X-A', ['Keep-Alive'] = 'timeout=5', Connection = 'X-A'}}",
            value(json!({"headers": {}})),
        )
        .hook(HookName::RequestTransform),
        o(
            "Stream with stream = 'true'",
            "request_transform rewrites the body with `stream = 'true'` (a string the upstream coerces)",
            "return {body = {model = 'm', stream = 'true'}}",
        )
        .hook(HookName::RequestTransform),
        o(
            "Answer without a body",
            "error_handler omits the required body",
            "return {status_code = 500}",
        )
        .hook(HookName::ErrorHandler),
        o(
            "Return a self-referencing table",
            "`t.self = t`",
            "local t = {} t.self = t return t",
        ),
        o(
            "Return 10,000 nested tables",
            "nesting far beyond max_depth",
            "local t = {} for i = 1, 1e4 do t = {t} end return {t = t}",
        ),
        o("Return NaN", "`0/0` as a value", "return {cost = 0/0}"),
        o("Return infinity", "`math.huge` as a value", "return {x = math.huge}"),
        o(
            "Return a non-UTF-8 string",
            "`'\\255\\254'` as a value",
            "return {s = '\\255\\254'}",
        ),
        o(
            "Return a non-UTF-8 key",
            "`'\\255'` as an object key",
            "return {['\\255'] = 1}",
        ),
        o(
            "Return a userdata",
            "the error userdata of a failed Rust call",
            "local ok, e = pcall(string.rep, 'x', -1, {}) return {e = e}",
        ),
        o(
            "Return a function inside a table",
            "`{f = print}`",
            "return {f = print}",
        ),
        o("Return a boolean key", "`{[true] = 1}`", "return {[true] = 1}"),
        o(
            "Bill a negative cost",
            "usage returns `{cost = -1}`",
            "return {cost = -1}",
        ),
        o(
            "Return a string where an object is due",
            "usage returns `'free'`",
            "return 'free'",
        ),
    ]);
}

/// sha256("a"), what an unpoisoned `hash.sha256` answers.
const SHA256_A: &str = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";

/// Every table a script can reach that it must not be able to change.
const SHARED_TABLES: &[&str] = &[
    "string",
    "table",
    "math",
    "bit",
    "os",
    "json",
    "string_utils",
    "time",
    "hash",
    "log",
];

fn helpers(v: &mut Vec<Case>) {
    use Group::Helpers as G;
    // json.array used to set its marker raw, replacing the read-only proxy's
    // metatable: the table became writable for every later call on the VM.
    for lib in SHARED_TABLES {
        v.push(
            Case::new(
                G,
                format!("Unlock '{lib}' with json.array, then poison it"),
                format!("call 1: `json.array({lib})`, then write into it; call 2 checks it is untouched"),
                format!(
                    r#"if phase == 1 then
  local marked = pcall(json.array, {lib})
  local wrote = pcall(function() {lib}.pwned = true; {lib}.sha256 = function() return "pwned" end end)
  return {{marked = marked, wrote = wrote}}
end
return {{pwned = tostring({lib}.pwned), sha = hash.sha256("a")}}"#
                ),
                Expect::Survives,
            )
            .two_calls(
                value(json!({"marked": false, "wrote": false})),
                value(json!({"pwned": "nil", "sha": SHA256_A})),
            ),
        );
    }
    let e = |name: &str, tries: &str, script: &str, expect: Expect| Case::new(G, name, tries, script, expect);
    v.extend([
        Case::new(
            G,
            "Wrap hash.sha256 to steal the next caller's key",
            "the adversarial pass's exploit: unlock `hash` with json.array, wrap sha256 to record its input; call 2 hashes a key",
            r#"if phase == 1 then
  pcall(function()
    local h = json.array(hash)
    local real = h.sha256
    rawset(h, "sha256", function(s) STOLEN = s return real(s) end)
  end)
  return {done = 1}
end
return {sha = hash.sha256("a"), stolen = tostring(STOLEN)}"#,
            Expect::Survives,
        )
        .two_calls(value(json!({"done": 1})), value(json!({"sha": SHA256_A, "stolen": "nil"}))),
        e(
            "json.array on a lazy request body",
            "replace the lazy body's metatable with the array marker",
            "return {ok = pcall(json.array, request.body), model = request.body.model}",
            value(json!({"ok": false, "model": "m"})),
        )
        .input(json!({"request": {"body": {"model": "m"}}})),
        e(
            "json.array on a table with the script's own metatable",
            "mark an object whose metatable the script set",
            "local t = setmetatable({}, {__index = function() return 1 end}) return {ok = pcall(json.array, t), x = t.x}",
            value(json!({"ok": false, "x": 1})),
        ),
        e(
            "json.array twice and on a decoded array",
            "marking is idempotent for tables the marker already owns",
            "local a = json.array({}) json.array(a) local d = json.array(json.decode('[1]')) return {a = json.encode(a), d = json.encode(d)}",
            value(json!({"a": "[]", "d": "[1]"})),
        ),
        e(
            "json.array on a string",
            "`json.array('x')`",
            "return {r = json.array('x')}",
            kind(ScriptError),
        ),
        // Building a multi-MB format takes tens of ms in a debug build on a
        // loaded machine: the helper's length check, not the clock, must
        // end these (before the fix time.format ran 4.9 s, past any limit).
        e(
            "time.format with a 6 MB format",
            "`time.format(0, string.rep('%c', 3e6))`: 4.9 s and 2.6 GB before the fix",
            "return {n = #time.format(0, string.rep('%c', 3e6))}",
            kind(ScriptError),
        )
        .timeout_ms(1000),
        e(
            "time.parse with a 6 MB format",
            "`time.parse` of a huge text with a huge format",
            "return {n = time.parse(string.rep('1', 2e6), string.rep('%Y', 1e6))}",
            kind(ScriptError),
        )
        .timeout_ms(1000),
        e(
            "os.date with a 6 MB format",
            "`os.date(string.rep('%c', 3e6))`: strftime per conversion in one C call",
            "return {n = #os.date(string.rep('%c', 3e6))}",
            kind(ScriptError),
        )
        .timeout_ms(1000),
        e(
            "time.format with a short format still works",
            "the bound does not get in the way of real formats",
            "return {s = time.format(0, '%Y-%m-%d %H:%M:%S'), t = time.parse('1970-01-02T00:00:00Z')}",
            value(json!({"s": "1970-01-01 00:00:00", "t": 86400})),
        ),
        e(
            "json.decode of a million empty arrays in 8 MB",
            "a 6 MB text whose tree costs far more outside the Lua heap (269 MB before the fix)",
            "return {n = #json.decode('[' .. string.rep('[],', 2e6) .. '[]]')}",
            kind(Memory),
        ),
        e(
            "json.decode caught by pcall and retried",
            "swallow the decode's memory error and decode again",
            "local s = '[' .. string.rep('[],', 2e6) .. '[]]' for i = 1, 20 do pcall(json.decode, s) end return {survived = true}",
            kind(Memory),
        ),
        e(
            "json.decode of duplicate keys",
            "`{\"a\":1,\"a\":2}`: the script and the upstream would see different values",
            r#"return {r = json.decode('{"a":1,"a":2}')}"#,
            kind(ScriptError),
        ),
        e(
            "hash and split of a 2 MB string",
            "big inputs to the digest and split helpers",
            "local s = string.rep('a,', 1e6) local ok = pcall(string_utils.split, s, ',') return {h = #hash.sha256(s), m = #hash.md5(s)}",
            Expect::Survives,
        ),
        e(
            "json.encode of a library table",
            "encode a read-only proxy and a table whose __index loops",
            "local a = pcall(json.encode, string) local b = pcall(json.encode, setmetatable({}, {__index = function(t, k) return t[k] end})) return {done = 1}",
            Expect::Survives,
        ),
        Case::new(
            G,
            "Fix math.random with randomseed for the next caller",
            "call 1: `math.randomseed(42)`; call 2 draws without seeding and compares with the seed-42 sequence",
            r#"if phase == 1 then math.randomseed(42) return {done = 1} end
local a = math.random(1, 1e9)
math.randomseed(42)
local b = math.random(1, 1e9)
math.randomseed(7)
local c = math.random()
math.randomseed(7)
return {same_as_seed_42 = a == b, seeded_repeats = c == math.random()}"#,
            Expect::Survives,
        )
        .two_calls(
            value(json!({"done": 1})),
            value(json!({"same_as_seed_42": false, "seeded_repeats": true})),
        ),
        e(
            "math.random bounds",
            "`random(m)`, `random(m, n)`, an empty interval",
            "local x = math.random(3) local y = math.random(5, 5) local ok = pcall(math.random, 2, 1) return {x = x >= 1 and x <= 3, y = y, ok = ok}",
            value(json!({"x": true, "y": 5, "ok": false})),
        ),
    ]);
}

fn errors(v: &mut Vec<Case>) {
    use Group::Errors as G;
    let se = || kind(ScriptError);
    v.extend([
        Case::new(G, "Raise error({})", "a table as the error value", "error({})", se()),
        Case::new(G, "Raise error(nil)", "nil as the error value", "error(nil)", se()),
        Case::new(
            G,
            "Raise an error whose __tostring loops",
            "`error(setmetatable({}, {__tostring = spin}))`: the host formats it",
            "error(setmetatable({}, {__tostring = function() while true do end end}))",
            kind(Timeout),
        ),
        Case::new(
            G,
            "Raise an error whose __tostring returns a table",
            "`__tostring` returns a non-string",
            "error(setmetatable({}, {__tostring = function() return {} end}))",
            se(),
        ),
        Case::new(
            G,
            "Raise an error whose __tostring raises",
            "`__tostring` itself errors",
            "error(setmetatable({}, {__tostring = function() error('inner') end}))",
            se(),
        ),
        Case::new(G, "Raise a function", "`error(print)`", "error(print)", se()),
        Case::new(G, "Raise json.null", "`error(json.null)`", "error(json.null)", se()),
        Case::new(
            G,
            "Raise a 1 MB message",
            "`error(string.rep('x', 1e6))`",
            "error(string.rep('x', 1e6))",
            se(),
        ),
        Case::new(
            G,
            "Forge a timeout message",
            "`error('script exceeded its time limit of 50 ms', 0)`",
            "error('script exceeded its time limit of 50 ms', 0)",
            se(),
        ),
        Case::new(
            G,
            "Forge an out-of-memory message",
            "`error('not enough memory', 0)`",
            "error('not enough memory', 0)",
            se(),
        ),
        Case::new(
            G,
            "Forge an out-of-memory error inside pcall",
            "`pcall(error, 'not enough memory', 0)` then carry on: LuaJIT's own \
             out-of-memory error is that very string, so the sandbox cannot tell them \
             apart and errs on the safe side (the VM is discarded)",
            "local ok = pcall(error, 'not enough memory', 0) return {caught = not ok}",
            kind(ErrorKind::Memory),
        ),
        Case::new(
            G,
            "Raise from a gsub callback",
            "an error crossing the Rust pattern port",
            "string.gsub('a', 'a', function() error('boom') end)",
            se(),
        ),
    ]);
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

const HEALTH_HOOK: HookName = HookName::RateLimit;

const HEALTH_SCRIPT: &str = r#"
local ok, n = pcall(function() return #string.rep("ab", 3, ",") end)
local s = string.gsub("hello world", "o", "0")
local t = {3, 1, 2}
table.sort(t)
return {
  allow = false,
  retry_after = 1.5,
  reason = table.concat({s, tostring(n), ("x"):upper(), tostring(LEAK), tostring(rawget(_G, "LEAK")),
    table.concat(t), type(string.upper), json.encode({a = json.null})}, "|"),
}
"#;

fn health_expected() -> Value {
    json!({"allow": false, "retry_after": 1.5, "reason": "hell0 w0rld|8|X|nil|nil|123|function|{\"a\":null}"})
}

/// Memory bombs get a time limit they cannot reach, so that on a loaded
/// machine the memory limit, not a race with the clock, decides them.
const MEMORY_GROUP_TIMEOUT_MS: u64 = 1000;

/// The case's `timeout_ms`.
fn timeout_of(case: &Case) -> u64 {
    match (case.timeout_ms, case.group) {
        (Some(ms), _) => ms,
        (None, Group::Memory) => MEMORY_GROUP_TIMEOUT_MS,
        (None, _) => TIMEOUT_MS,
    }
}

/// How long a call of the case may take: 2x its time limit.
fn bound_of(case: &Case) -> f64 {
    2.0 * timeout_of(case) as f64
}

fn yaml_for(case: &Case) -> String {
    // JSON strings are valid YAML double-quoted scalars, whatever the bytes.
    format!(
        "scripts:\n  pool: {{size: 1}}\n  defaults: {{timeout_ms: {}, memory_mb: {MEMORY_MB}}}\n  {}:\n    script: {}\n  {}:\n    script: {}\n",
        timeout_of(case),
        case.hook.as_str(),
        serde_json::to_string(&case.script).unwrap(),
        HEALTH_HOOK.as_str(),
        serde_json::to_string(HEALTH_SCRIPT).unwrap(),
    )
}

#[derive(Debug, Clone)]
struct Outcome {
    observed: String,
    elapsed_ms: f64,
    failures: Vec<String>,
}

impl Outcome {
    fn to_json(&self) -> Value {
        json!({"observed": self.observed, "elapsed_ms": self.elapsed_ms, "failures": self.failures})
    }

    fn from_json(v: &Value) -> Outcome {
        Outcome {
            observed: v["observed"].as_str().unwrap_or_default().to_owned(),
            elapsed_ms: v["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
            failures: v["failures"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
        }
    }
}

fn short(s: &str, max: usize) -> String {
    let s = s.replace(['\n', '\r', '\t'], " ");
    if s.chars().count() <= max {
        s
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

fn describe(r: &Result<Value, llmproxy_core::HookError>) -> String {
    match r {
        Ok(v) => format!("ok {}", short(&v.to_string(), 70)),
        Err(e) => format!("{}: {}", e.kind, short(&e.message, 70)),
    }
}

fn matches(expect: &Expect, r: &Result<Value, llmproxy_core::HookError>) -> bool {
    match (expect, r) {
        (Expect::Kind(k), Err(e)) => e.kind == *k,
        (Expect::AnyOf(ks), Err(e)) => ks.contains(&e.kind),
        (Expect::Value(v), Ok(got)) => got == v,
        (Expect::Survives, Ok(_)) => true,
        (Expect::Survives, Err(e)) => e.kind != ErrorKind::Internal && e.kind != ErrorKind::BadInput,
        _ => false,
    }
}

/// Run one case in this thread.
fn run_case_inline(case: &Case) -> Outcome {
    let mut failures = Vec::new();
    // A script that does not compile is refused by `Config::from_yaml` or
    // by `Engine::new`; both count as "rejected".
    let built = Instant::now();
    let engine = match Config::from_yaml(&yaml_for(case), Path::new(".")).and_then(Engine::new) {
        Ok(engine) => engine,
        Err(e) => {
            let ms = built.elapsed().as_secs_f64() * 1000.0;
            let observed = format!("config rejected: {}", short(&e.to_string(), 70));
            if !matches!(case.steps[0].expect, Expect::Rejected) {
                failures.push(format!(
                    "expected {}, but the engine refused the script: {e}",
                    case.steps[0].expect.describe()
                ));
            }
            return Outcome {
                observed,
                elapsed_ms: ms,
                failures,
            };
        }
    };

    let mut observed = Vec::new();
    let mut max_ms: f64 = 0.0;
    for (i, step) in case.steps.iter().enumerate() {
        if matches!(step.expect, Expect::Rejected) {
            failures.push(String::from(
                "expected the config to be rejected, but the engine accepted it",
            ));
            break;
        }
        let discarded_before = engine.pool_stats().discarded;
        let t = Instant::now();
        let r = engine.run_json(case.hook, &step.input);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        max_ms = max_ms.max(ms);
        let what = describe(&r);
        let label = if case.steps.len() > 1 {
            format!("call {}: ", i + 1)
        } else {
            String::new()
        };
        observed.push(format!("{label}{what}"));
        if !matches(&step.expect, &r) {
            failures.push(format!("{label}expected {}, got {what}", step.expect.describe()));
        }
        if ms > bound_of(case) {
            failures.push(format!(
                "{label}took {ms:.1} ms, more than 2x the {} ms limit",
                timeout_of(case)
            ));
        }
        if let Err(e) = &r {
            if matches!(e.kind, ErrorKind::Timeout | ErrorKind::Memory)
                && engine.pool_stats().discarded <= discarded_before
            {
                failures.push(format!("{label}the VM that hit the {} limit was not discarded", e.kind));
            }
        }
        if step.expect.limit_kind() && r.is_ok() {
            failures.push(format!("{label}a limit case returned normally"));
        }
    }

    // The process keeps serving: a normal script on the same pool answers.
    let t = Instant::now();
    let health = engine.run_json(HEALTH_HOOK, &json!({}));
    let health_ms = t.elapsed().as_secs_f64() * 1000.0;
    match &health {
        Ok(v) if *v == health_expected() => {}
        other => failures.push(format!("the next normal call failed: {}", describe(other))),
    }
    if health_ms > bound_of(case) {
        failures.push(format!("the next normal call took {health_ms:.1} ms"));
    }
    Outcome {
        observed: observed.join("; "),
        elapsed_ms: max_ms,
        failures,
    }
}

/// Run one case on its own thread, reporting a hang instead of waiting forever.
fn run_case_guarded(case: &Case) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let c = case.clone();
    std::thread::Builder::new()
        .name(format!("case: {}", case.name))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case_inline(&c)));
            let outcome = r.unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                Outcome {
                    observed: format!("PANIC in the host: {}", short(&msg, 70)),
                    elapsed_ms: f64::NAN,
                    failures: vec![format!("the script made the host panic: {msg}")],
                }
            });
            let _ = tx.send(outcome);
        })
        .expect("spawn case thread");
    match rx.recv_timeout(HANG_GUARD) {
        Ok(o) => o,
        // The thread is left spinning; the process exits at the end of the run.
        Err(mpsc::RecvTimeoutError::Timeout) => Outcome {
            observed: format!("HUNG: no answer after {} s", HANG_GUARD.as_secs()),
            elapsed_ms: HANG_GUARD.as_secs_f64() * 1000.0,
            failures: vec![format!("the call never returned (> {} s)", HANG_GUARD.as_secs())],
        },
        Err(mpsc::RecvTimeoutError::Disconnected) => Outcome {
            observed: String::from("PANIC in the case thread"),
            elapsed_ms: f64::NAN,
            failures: vec![String::from("the case thread panicked (see stderr)")],
        },
    }
}

/// Run one case in a child process (this test binary again), so that a crash
/// or a hang costs one case, not the suite.
fn run_case_isolated(case: &Case) -> Outcome {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "isolated_case_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &case.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child test process");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let mut hung = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if started.elapsed() > HANG_GUARD {
            hung = true;
            let _ = child.kill();
            break child.wait().expect("reap child");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if hung {
        return Outcome {
            observed: format!("HUNG: killed after {} s", HANG_GUARD.as_secs()),
            elapsed_ms: HANG_GUARD.as_secs_f64() * 1000.0,
            failures: vec![format!(
                "the call never returned (> {} s); the worker would spin forever",
                HANG_GUARD.as_secs()
            )],
        };
    }
    // libtest prints "test isolated_case_child ... " first, on the same line.
    if let Some(line) = stdout
        .lines()
        .find_map(|l| l.find(CHILD_MARK).map(|i| &l[i + CHILD_MARK.len()..]))
    {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            return Outcome::from_json(&v);
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let how = match status.signal() {
        Some(sig) => format!("killed by signal {sig}"),
        None => format!("exited with {status}"),
    };
    let last = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .find(|l| l.contains("overflow") || l.contains("fatal") || l.contains("panicked"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .to_owned();
    Outcome {
        observed: format!("PROCESS DIED ({how}): {}", short(&last, 70)),
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        failures: vec![format!("the gateway process died ({how}): {last}")],
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn hostile_scripts() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cases = cases();
    assert!(cases.len() >= 40, "at least 40 cases, found {}", cases.len());
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.as_str()), "duplicate case name '{}'", c.name);
    }

    let mut results: Vec<(&Case, Outcome)> = Vec::new();
    for case in &cases {
        let outcome = if case.isolate {
            run_case_isolated(case)
        } else {
            run_case_guarded(case)
        };
        results.push((case, outcome));
    }

    // The report.
    let mut report = String::new();
    let failed = results.iter().filter(|(_, o)| !o.failures.is_empty()).count();
    report.push_str(&format!(
        "\n## Sandbox escape suite: {} cases, {} passed, {} failed (timeout_ms {TIMEOUT_MS}, memory_mb {MEMORY_MB}, bound {BOUND_MS} ms; memory bombs: timeout_ms {MEMORY_GROUP_TIMEOUT_MS})\n",
        results.len(),
        results.len() - failed,
        failed
    ));
    let cell = |s: &str| s.replace('|', "\\|");
    for group in Group::ALL {
        report.push_str(&format!(
            "\n### {}\n\n| name | what it tries | outcome | elapsed ms |\n|---|---|---|---:|\n",
            group.title()
        ));
        for (case, o) in results.iter().filter(|(c, _)| c.group == group) {
            let verdict = if o.failures.is_empty() {
                format!("✅ {}", o.observed)
            } else {
                format!("❌ **FAIL** — {} (observed: {})", o.failures.join("; "), o.observed)
            };
            report.push_str(&format!(
                "| {} | {} | {} | {:.1} |\n",
                cell(&case.name),
                cell(&case.tries),
                cell(&verdict),
                o.elapsed_ms
            ));
        }
    }
    println!("{report}");

    let failures: Vec<String> = results
        .iter()
        .filter(|(_, o)| !o.failures.is_empty())
        .map(|(c, o)| format!("- {}: {}", c.name, o.failures.join("; ")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} hostile-script cases failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
}

/// Entry point of the child process that runs one isolated case.
#[test]
#[ignore = "run by hostile_scripts in a child process"]
fn isolated_case_child() {
    let Ok(name) = std::env::var(CHILD_ENV) else { return };
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case named '{name}'"));
    let outcome = run_case_inline(&case);
    println!("{CHILD_MARK}{}", outcome.to_json());
}

// ---- process memory ----

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kb * 1024
}

/// Reset the peak RSS (`VmHWM`) to the current RSS; false when unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

const MB: u64 = 1 << 20;

/// An engine whose usage script runs `script` with memory_mb 10.
fn bomb_engine(script: &str) -> Engine {
    let yaml = format!(
        "scripts:\n  pool: {{size: 1}}\n  defaults: {{timeout_ms: 1000, memory_mb: 10}}\n  usage:\n    script: {}\n",
        serde_json::to_string(script).unwrap()
    );
    Engine::new(Config::from_yaml(&yaml, Path::new(".")).expect("config")).expect("engine")
}

/// Run `bomb` a few times; returns (growth of RSS after, growth of the peak).
fn measure(engine: &Engine, bomb: u64, expect: &[ErrorKind]) -> (u64, Option<u64>) {
    // Warm up: the VM exists and the allocator has seen a normal call.
    engine
        .run_json(HookName::Usage, &json!({"bomb": 0}))
        .expect("a normal call");
    let peak_ok = reset_peak_rss();
    let before = proc_status_bytes("VmRSS:");
    for _ in 0..5 {
        let r = engine.run_json(HookName::Usage, &json!({"bomb": bomb}));
        match r {
            Err(e) => assert!(expect.contains(&e.kind), "bomb {bomb}: {e}"),
            Ok(v) => panic!("bomb {bomb} returned normally: {v}"),
        }
        engine
            .run_json(HookName::Usage, &json!({"bomb": 0}))
            .expect("a normal call after the bomb");
    }
    let after = proc_status_bytes("VmRSS:");
    let peak = peak_ok.then(|| proc_status_bytes("VmHWM:"));
    (after.saturating_sub(before), peak.map(|p| p.saturating_sub(before)))
}

const RSS_SCRIPT: &str = r#"
if bomb == 1 then return {n = #string.rep("x", 1e9)} end
if bomb == 2 then local t = {} while true do t[#t + 1] = {} end end
if bomb == 3 then local s = string.gsub(string.rep("x", 2000), "x", string.rep("y", 50000)) return {n = #s} end
return {ok = 1}
"#;

#[test]
fn rss_stays_bounded_under_memory_bombs() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let engine = bomb_engine(RSS_SCRIPT);
    let allowed = 10 * MB + 16 * MB;
    let mut problems = Vec::new();
    println!("\n| bomb (memory_mb 10, 5 runs) | RSS growth after | peak RSS growth |\n|---|---:|---:|");
    for (bomb, label) in [(1, "string.rep('x', 1e9)"), (2, "table growth `t[#t+1] = {}`")] {
        let (after, peak) = measure(&engine, bomb, &[ErrorKind::Memory]);
        let peak_s = peak.map_or(String::from("n/a"), |p| format!("{:.1} MB", p as f64 / MB as f64));
        println!("| {label} | {:.1} MB | {peak_s} |", after as f64 / MB as f64);
        if after >= allowed {
            problems.push(format!("{label}: RSS grew by {:.1} MB", after as f64 / MB as f64));
        }
        if let Some(p) = peak.filter(|p| *p >= allowed) {
            problems.push(format!("{label}: peak RSS grew by {:.1} MB", p as f64 / MB as f64));
        }
    }
    assert!(
        problems.is_empty(),
        "memory_mb 10 did not bound the process: {}",
        problems.join("; ")
    );
}

/// The Rust pattern port builds `gsub` results in a Rust buffer: that buffer
/// must be bounded by the memory allowance too, or a script can make the
/// process allocate far more than `memory_mb`.
#[test]
fn rss_stays_bounded_under_gsub_amplification() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let engine = bomb_engine(RSS_SCRIPT);
    let allowed = 10 * MB + 16 * MB;
    let (after, peak) = measure(&engine, 3, &[ErrorKind::Memory, ErrorKind::Timeout]);
    let peak_s = peak.map_or(String::from("n/a"), |p| format!("{:.1} MB", p as f64 / MB as f64));
    println!("\n| bomb (memory_mb 10, 5 runs) | RSS growth after | peak RSS growth |\n|---|---:|---:|");
    println!(
        "| gsub amplification (100 MB output) | {:.1} MB | {peak_s} |",
        after as f64 / MB as f64
    );
    assert!(after < allowed, "RSS grew by {:.1} MB", after as f64 / MB as f64);
    if let Some(p) = peak {
        assert!(
            p < allowed,
            "peak RSS grew by {:.1} MB under a 10 MB limit",
            p as f64 / MB as f64
        );
    }
}
