//! What a script may touch, as data. Anything not listed here does not exist
//! in a script's environment. `docs/architecture.md` ("Sandbox") and the
//! README list what is left out on purpose; `tests/sandbox_escapes.rs` has
//! one named test per attack.

/// Base functions copied as they are from LuaJIT.
pub const BASE: &[&str] = &[
    "assert", "error", "ipairs", "rawequal", "select", "tonumber", "tostring", "type", "unpack",
];

/// Base functions replaced by sandbox versions (see `prelude.lua`):
/// `pcall`/`xpcall` re-raise a timeout or memory error instead of swallowing
/// it; `pairs`/`next`/`rawget` see through lazy bodies and read-only library
/// tables; `collectgarbage` only answers `"count"`; `print` goes to the log.
pub const WRAPPED: &[&str] = &[
    "pcall",
    "xpcall",
    "pairs",
    "next",
    "rawget",
    "setmetatable",
    "getmetatable",
    "collectgarbage",
    "print",
];

/// Standard libraries and the functions kept from each. Every library is
/// exposed through a read-only proxy.
pub const LIBRARIES: &[(&str, &[&str])] = &[
    (
        "string",
        &[
            "byte", "char", "find", "format", "gmatch", "gsub", "len", "lower", "match", "rep", "reverse", "sub",
            "upper",
        ],
    ),
    ("table", &["concat", "insert", "maxn", "remove", "sort"]),
    (
        "math",
        &[
            "abs",
            "acos",
            "asin",
            "atan",
            "atan2",
            "ceil",
            "cos",
            "cosh",
            "deg",
            "exp",
            "floor",
            "fmod",
            "frexp",
            "huge",
            "ldexp",
            "log",
            "log10",
            "max",
            "min",
            "modf",
            "pi",
            "pow",
            "rad",
            "random",
            "randomseed",
            "sin",
            "sinh",
            "sqrt",
            "tan",
            "tanh",
        ],
    ),
    (
        "bit",
        &[
            "tobit", "tohex", "bnot", "band", "bor", "bxor", "lshift", "rshift", "arshift", "rol", "ror", "bswap",
        ],
    ),
    ("os", &["time", "clock", "date"]),
];

/// Never present, whatever else changes; checked by the escape tests.
pub const FORBIDDEN: &[&str] = &[
    "io",
    "package",
    "require",
    "module",
    "load",
    "loadstring",
    "dofile",
    "loadfile",
    "debug",
    "ffi",
    "jit",
    "getfenv",
    "setfenv",
    "rawset",
    "newproxy",
    "gcinfo",
    "coroutine",
];

/// Base functions that call back into Lua from C (`__tostring`, the log
/// line's values): wrapped so their nesting is bounded (see `prelude.lua`).
/// `string.format`, `string.gsub`, `table.sort` and `log.*` are wrapped too.
pub const CALLS_BACK: &[&str] = &["tostring", "print"];
