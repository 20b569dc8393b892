//! Differential tests of `sandbox::pattern` against LuaJIT's own
//! `string.find`, `string.match`, `string.gmatch` and `string.gsub`.
//!
//! Every case runs in two states: a plain `mlua::Lua::new()` (the built-ins)
//! and one where `pattern::install` replaced the four functions (with a check
//! that always succeeds). A case's complete outcome — `pcall` status, the
//! number of results, every result value, or the error value with its
//! `chunk:line:` prefix — is serialised in Lua and must be identical.
//!
//! The remaining tests check that pattern bombs end at the deadline of the
//! check callback and that deep matcher recursion is an error.
//!
//! `PATTERN_COMPAT_DUMP=1 cargo test --test pattern_compat -- --nocapture`
//! prints every case with its outcome.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmproxy_core::sandbox::pattern::{self, StepCheck};
use mlua::{Lua, Table};

/// Helpers shared by both states. `ser` must not use the functions under
/// test, so it serialises with `string.format("%q")` only.
const PRELUDE: &str = r##"
local function ser(v)
  local t = type(v)
  if t == "string" then
    return (string.format("%q", v))
  elseif t == "number" or t == "boolean" or t == "nil" then
    return tostring(v)
  elseif t == "table" then
    local parts = {}
    local n = v.n or #v
    for i = 1, n do parts[#parts + 1] = ser(v[i]) end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif t == "userdata" then
    return "userdata<" .. tostring(v) .. ">"
  else
    return t
  end
end
function pack(...) return { n = select("#", ...), ... } end
function collect(it)
  local t = {}
  while true do
    local r = pack(it())
    if r.n == 0 or r[1] == nil then t[#t + 1] = r; break end
    t[#t + 1] = r
    if #t > 10000 then error("runaway gmatch") end
  end
  return t
end
do
  local b = {}
  for i = 0, 255 do b[#b + 1] = string.char(i) end
  ALL = table.concat(b)
end
function run_case(src)
  local f, err = loadstring(src, "=case")
  if not f then return "COMPILE: " .. err end
  return ser(pack(pcall(f)))
end
"##;

/// One table-driven case: `string.<func>(<subject>, <pattern>, <extra>)`,
/// every part a Lua expression. For `gmatch` the iterator is drained into a
/// table of packed results (the last entry is the exhausted call).
struct Case {
    func: &'static str,
    subject: &'static str,
    pattern: &'static str,
    extra: &'static str,
}

const fn c(func: &'static str, subject: &'static str, pattern: &'static str, extra: &'static str) -> Case {
    Case {
        func,
        subject,
        pattern,
        extra,
    }
}

impl Case {
    /// The case as Lua source, in two forms: a tail call (LuaJIT then reports
    /// no position and names the function `?`) and an ordinary call inside a
    /// chunk (errors get the `case:1:` prefix and the function's name).
    fn sources(&self) -> [String; 2] {
        let (subject, pattern, func) = (self.subject, self.pattern, self.func);
        let extra = if self.extra.is_empty() {
            String::new()
        } else {
            format!(", {}", self.extra)
        };
        if func == "gmatch" {
            [
                format!("return collect(string.gmatch({subject}, {pattern}{extra}))"),
                format!(
                    "local t = {{}} for a, b, c in string.gmatch({subject}, {pattern}{extra}) do \
                     t[#t + 1] = pack(a, b, c) if #t > 10000 then break end end return t"
                ),
            ]
        } else {
            [
                format!("return string.{func}({subject}, {pattern}{extra})"),
                format!("local r = pack(string.{func}({subject}, {pattern}{extra})) return r"),
            ]
        }
    }
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // --- character classes ------------------------------------------------
    c("match", r#""hello World 123""#, r#""%a+""#, ""),
    c("find", r#""abc123def""#, r#""%d+""#, ""),
    c("match", r#""abcDEFghi""#, r#""%u+""#, ""),
    c("match", r#""ABCdefGHI""#, r#""%l+""#, ""),
    c("gsub", r#""a1 b2\tc3\n\v\f\r""#, r#""%s""#, r#""_""#),
    c("match", r#""hello_world-42""#, r#""[%w_]+""#, ""),
    c("match", r#""0xDEADbeefZ""#, r#""0x(%x+)""#, ""),
    c("gsub", r#""a,b;c.d!e""#, r#""%p""#, r#""""#),
    c("gsub", r#""a\1b\2c\127d""#, r#""%c""#, r#""?""#),
    c("find", r#""a\0b""#, r#""%z""#, ""),
    c("gsub", r#""a\0b\0""#, r#""%z""#, r#""0""#),
    c("gsub", r#""a b\tc!~""#, r#""%g""#, r#""x""#),
    c("gsub", "ALL", r#""%a""#, r#""""#),
    c("gsub", "ALL", r#""%A""#, r#""""#),
    c("gsub", "ALL", r#""%c""#, r#""""#),
    c("gsub", "ALL", r#""%C""#, r#""""#),
    c("gsub", "ALL", r#""%d""#, r#""""#),
    c("gsub", "ALL", r#""%D""#, r#""""#),
    c("gsub", "ALL", r#""%g""#, r#""""#),
    c("gsub", "ALL", r#""%G""#, r#""""#),
    c("gsub", "ALL", r#""%l""#, r#""""#),
    c("gsub", "ALL", r#""%L""#, r#""""#),
    c("gsub", "ALL", r#""%p""#, r#""""#),
    c("gsub", "ALL", r#""%P""#, r#""""#),
    c("gsub", "ALL", r#""%s""#, r#""""#),
    c("gsub", "ALL", r#""%S""#, r#""""#),
    c("gsub", "ALL", r#""%u""#, r#""""#),
    c("gsub", "ALL", r#""%U""#, r#""""#),
    c("gsub", "ALL", r#""%w""#, r#""""#),
    c("gsub", "ALL", r#""%W""#, r#""""#),
    c("gsub", "ALL", r#""%x""#, r#""""#),
    c("gsub", "ALL", r#""%X""#, r#""""#),
    c("gsub", "ALL", r#""%z""#, r#""""#),
    c("gsub", "ALL", r#""%Z""#, r#""""#),
    c("gsub", "ALL", r#"".""#, r#""""#),
    c("gsub", "ALL", r#""%%""#, r#""""#),
    c("gsub", "ALL", r#""%q""#, r#""""#),
    c("gsub", "ALL", r#""[%a%d_]""#, r#""""#),
    c("gsub", "ALL", r#""[^%a%d_]""#, r#""""#),
    c("gsub", "ALL", r#""[%S%z]""#, r#""""#),
    // --- sets ---------------------------------------------------------------
    c("match", r#""hello""#, r#""[aeiou]+""#, ""),
    c("gsub", r#""hello world""#, r#""[^aeiou ]""#, r#""*""#),
    c("gsub", r#""abcxyz""#, r#""[a-c]""#, r#"".""#),
    c("gsub", r#""abcxyz""#, r#""[z-a]""#, r#"".""#),
    c("match", r#""a-b-c""#, r#""[a%-]+""#, ""),
    c("gsub", r#""a-z""#, r#""[a-]""#, r#""!""#),
    c("gsub", r#""a-z""#, r#""[-z]""#, r#""!""#),
    c("match", r#""]]]x""#, r#""[]]+""#, ""),
    c("match", r#""x]""#, r#""[^]]""#, ""),
    c("match", r#""^^x""#, r#""[%^x]+""#, ""),
    c("match", r#""^^x""#, r#""[x^]+""#, ""),
    c("gsub", r#""a[b]c""#, r#""[%[%]]""#, r#""""#),
    c("gsub", r#""abc-%d9""#, r#""[a-%d]""#, r#""@""#),
    c("gsub", r#""abc123""#, r#""[%a-z]""#, r#""@""#),
    c("gsub", r#""a.b*c""#, r#""[.*]""#, r#""""#),
    // --- %b and %f ------------------------------------------------------------
    c("match", r#""f(a(b)c) d""#, r#""%b()""#, ""),
    c("gsub", r#""x [a] [b [c]] y""#, r#""%b[]""#, r#""<>""#),
    c("find", r#""((()""#, r#""%b()""#, ""),
    c("match", r#""'quoted' rest""#, r#""%b''""#, ""),
    c("find", r#""if (a and (b or c)) then""#, r#""(%b())%s*then""#, ""),
    c("gsub", r#""THE (quick) fox""#, r#""%f[%a]%a+""#, r#""W""#),
    c("find", r#""hello world""#, r#""%f[%w]%w+""#, "2"),
    c("gmatch", r#""the cat sat on the mat""#, r#""%f[%a]%a+%f[%A]""#, ""),
    c("find", r#""abc""#, r#""%f[%z]""#, ""),
    c("find", r#""abc""#, r#""%f[^%z]""#, ""),
    c("gsub", r#""hello world from lua""#, r#""%f[%w]%w+""#, "string.upper"),
    c("match", r#""foo""#, r#""%f[%l]""#, ""),
    // --- captures -----------------------------------------------------------
    c("find", r#""hello world""#, r#""(o)(r)""#, ""),
    c("match", r#""key=value""#, r#""(%w+)=(%w+)""#, ""),
    c("match", r#""abc""#, r#""()b()""#, ""),
    c("find", r#""abc""#, r#""()""#, ""),
    c("find", r#""abc""#, r#""(b)()""#, ""),
    c("match", r#""  trim me  ""#, r#""^%s*(.-)%s*$""#, ""),
    c("match", r#""abcd""#, r#""((a)(b))(c)""#, ""),
    c("match", r#""2024-01-15""#, r#""(%d+)-(%d+)-(%d+)""#, ""),
    c("match", r#"'say "hi" and "bye"'"#, r#"[[(["'])(.-)%1]]"#, ""),
    c("find", r#""abcabc""#, r#""(abc)%1""#, ""),
    c("match", r#""xyzxyz""#, r#""(x)(y)(z)%1%2%3""#, ""),
    c("match", r#""aa""#, r#""()a%1""#, ""),
    c("match", r#""abab""#, r#""(a(b)%2)""#, ""),
    c("match", "string.rep('a', 32)", "string.rep('(a)', 32)", ""),
    // --- anchors and quantifiers --------------------------------------------
    c("find", r#""abc""#, r#""^b""#, ""),
    c("find", r#""abc""#, r#""^a""#, ""),
    c("find", r#""abc""#, r#""^b""#, "2"),
    c("match", r#""abc""#, r#""c$""#, ""),
    c("match", r#""ab$c""#, r#""b$c""#, ""),
    c("match", r#""a^b""#, r#""a^b""#, ""),
    c("gsub", r#""aaa""#, r#""^a""#, r#""b""#),
    c("gsub", r#""hello""#, r#""$""#, r#""!""#),
    c("gsub", r#""hello""#, r#""^""#, r#"">""#),
    c("gsub", r#""""#, r#""^$""#, r#""x""#),
    c("match", r#""aaa""#, r#""a-""#, ""),
    c("match", r#""aaa""#, r#""a-$""#, ""),
    c("match", r#""<a><b>""#, r#""<.->""#, ""),
    c("match", r#""<a><b>""#, r#""<.*>""#, ""),
    c("match", r#""aaab""#, r#""a+b""#, ""),
    c("match", r#""b""#, r#""a+b""#, ""),
    c("match", r#""b""#, r#""a?b""#, ""),
    c("match", r#""ab""#, r#""a?b""#, ""),
    c("match", r#""xyz""#, r#"".?.?.?.?""#, ""),
    c("match", r#""pi is 3.14159!""#, r#""%d+%.?%d*""#, ""),
    c("match", r#""a+b""#, r#""a%+b""#, ""),
    // --- gsub replacements --------------------------------------------------
    c("gsub", r#""hello world""#, r#""o""#, r#""0""#),
    c("gsub", r#""hello world""#, r#""(%w+)""#, r#""<%1>""#),
    c("gsub", r#""hello world""#, r#""(%w+) (%w+)""#, r#""%2 %1""#),
    c("gsub", r#""hello""#, r#""""#, r#""-""#),
    c("gsub", r#""abc""#, r#""%w""#, r#""%0%0""#),
    c("gsub", r#""abc""#, r#""%w""#, r#""%1.""#),
    c("gsub", r#""abc""#, r#""%w""#, r#""%%""#),
    c("gsub", r#""abc""#, r#""b""#, r#""x%y""#),
    c("gsub", r#""abc""#, r#""b""#, r#""x%""#),
    c("gsub", r#""abc""#, r#""b""#, r#""%2""#),
    c("gsub", r#""abc""#, r#""(b)""#, r#""%2""#),
    c("gsub", r#""abc""#, r#""()b""#, r#""[%1]""#),
    c("gsub", r#""abc""#, r#""(b""#, r#""x""#),
    c("gsub", r#""abc""#, r#""(b""#, r#""%1""#),
    c("gsub", r#""abc""#, r#""%w*""#, r#""-""#),
    c("gsub", r#""abc""#, r#""b""#, "5"),
    c("gsub", r#""abc""#, r#""b""#, "1.5"),
    c("gsub", r#""a\0c""#, r#""%z""#, r#""[\0]""#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", 2"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", 0"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", -1"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", 2.7"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", "3""#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", nil"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", 2^32 + 1"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", 1e20"#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", "x""#),
    c("gsub", r#""aaaa""#, r#""a""#, r#""b", {}"#),
    c("gsub", r#""$name is $age, $unknown""#, r#""%$(%w+)""#, "{name = 'Bob', age = 42}"),
    c("gsub", r#""a b c""#, r#""%w""#, "{a = false, b = 'B'}"),
    c("gsub", r#""a b c""#, r#""%w""#, "{a = {}}"),
    c("gsub", r#""a b c""#, r#""%w""#, "{a = true}"),
    c("gsub", r#""abc""#, r#""()(%w)""#, "{[1] = 'one', [3] = 'three'}"),
    c("gsub", r#""abc""#, r#""%w""#, "setmetatable({}, {__index = function(t, k) return k:upper() .. '!' end})"),
    c("gsub", r#""abc""#, r#""%w""#, "setmetatable({}, {__index = function(t, k) error('idx ' .. k) end})"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) return ch:upper() .. '.' end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) return false end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) return 1.5 end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) return {} end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) return print end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) error('boom ' .. ch) end"),
    c("gsub", r#""abc""#, r#""%w""#, "function(ch) error('boom', 0) end"),
    c("gsub", r#""k=v, a=b""#, r#""(%w+)=(%w+)""#, "function(k, v) return v .. '=' .. k end"),
    c("gsub", r#""abc""#, r#""()(%w)""#, "function(p, ch) return p .. ch end"),
    c("gsub", r#""abc""#, r#""(b""#, "function(x) return 'y' end"),
    c("gsub", r#""abc""#, r#""(b""#, "{}"),
    c("gsub", r#""a b""#, r#""%w""#, "function(w) return (string.gsub(w, '%w', '<%0>')) end"),
    c("gsub", r#""abc""#, r#""b""#, "true"),
    c("gsub", r#""abc""#, r#""b""#, ""),
    c("gsub", r#""abc""#, r#""b""#, r#"nil, "x""#),
    // --- gmatch -------------------------------------------------------------
    c("gmatch", r#""one two  three""#, r#""%a+""#, ""),
    c("gmatch", r#""k1=v1, k2=v2""#, r#""(%w+)=(%w+)""#, ""),
    c("gmatch", r#""abc""#, r#""x*""#, ""),
    c("gmatch", r#""abc""#, r#""%a*""#, ""),
    c("gmatch", r#""abc""#, r#""()""#, ""),
    c("gmatch", r#""^a^a""#, r#""^a""#, ""),
    c("gmatch", r#""""#, r#""""#, ""),
    c("gmatch", r#""a,b,,c""#, r#""([^,]*)""#, ""),
    c("gmatch", r#""abc""#, r#""%""#, ""),
    c("gmatch", r#""(a)(b)""#, r#""%b()""#, ""),
    c("gmatch", "123", r#""%d""#, ""),
    c("gmatch", r#""h\195\169llo w\195\182rld""#, r#""[\128-\255]+""#, ""),
    // --- malformed patterns -------------------------------------------------
    c("find", r#""a""#, r#""%""#, ""),
    c("find", r#""a""#, r#""[a""#, ""),
    c("find", r#""a""#, r#""[a%""#, ""),
    c("find", r#""a""#, r#""[^""#, ""),
    c("find", r#""a""#, r#""[]""#, ""),
    c("find", r#""a""#, r#""[^]""#, ""),
    c("match", r#""a""#, r#""%f""#, ""),
    c("match", r#""a""#, r#""%fa""#, ""),
    c("match", r#""a""#, r#""%f[a""#, ""),
    c("match", r#""a""#, r#""%b""#, ""),
    c("match", r#""a""#, r#""%ba""#, ""),
    c("match", r#""a""#, r#""(()""#, ""),
    c("match", r#""a""#, r#""a)""#, ""),
    c("find", r#""a)""#, r#"")""#, ""),
    c("match", r#""a""#, r#""%1""#, ""),
    c("match", r#""aa""#, r#""(a)%2""#, ""),
    c("match", r#""a""#, r#""%0""#, ""),
    c("match", r#""aa""#, r#""(a%1)""#, ""),
    c("find", r#""a(b""#, r#""(""#, ""),
    c("match", "string.rep('a', 40)", "string.rep('(a)', 33)", ""),
    c("match", r#""b""#, "string.rep('(', 40)", ""),
    c("gsub", r#""x""#, r#""[""#, r#""""#),
    // --- recursion depth (LuaJIT: 200 levels) -------------------------------
    c("find", "string.rep('a', 300)", "string.rep('a?', 199)", ""),
    c("find", "string.rep('a', 300)", "string.rep('a?', 200)", ""),
    c("find", "string.rep('a', 300)", "string.rep('a?', 5000)", ""),
    c("find", "string.rep('b', 300)", "string.rep('a?', 5000)", ""),
    c("match", "string.rep('a', 300)", "string.rep('a', 300)", ""),
    c("match", "string.rep('a', 300)", "string.rep('a-', 300)", ""),
    c("match", "string.rep('a', 300)", "string.rep('%a*', 150)", ""),
    // --- init ---------------------------------------------------------------
    c("find", r#""abc""#, r#""b""#, "-1"),
    c("find", r#""abc""#, r#""b""#, "-2"),
    c("find", r#""abc""#, r#""b""#, "-10"),
    c("find", r#""abc""#, r#""b""#, "0"),
    c("find", r#""abc""#, r#""""#, "4"),
    c("find", r#""abc""#, r#""""#, "5"),
    c("find", r#""abc""#, r#""""#, "100"),
    c("find", r#""abc""#, r#""x*""#, "100"),
    c("match", r#""abc""#, r#""()""#, "100"),
    c("match", r#""abc""#, r#""()""#, "-100"),
    c("find", r#""abc""#, r#""c""#, "3.9"),
    c("find", r#""abc""#, r#""b""#, r#""2""#),
    c("find", r#""abc""#, r#""b""#, r#"" 0x2 ""#),
    c("find", r#""abc""#, r#""b""#, r#""x""#),
    c("find", r#""abc""#, r#""b""#, "{}"),
    c("find", r#""abc""#, r#""b""#, "2^31"),
    c("find", r#""abc""#, r#""b""#, "-2^31"),
    c("find", r#""abc""#, r#""b""#, "0/0"),
    c("find", r#""abc""#, r#""b""#, "math.huge"),
    c("find", r#""abc""#, r#""c""#, "-math.huge"),
    c("match", r#""abc""#, r#""^(.)""#, "3"),
    // --- plain find ---------------------------------------------------------
    c("find", r#""a.b""#, r#"".""#, "1, true"),
    c("find", r#""a+b""#, r#""+""#, "1, true"),
    c("find", r#""a%b""#, r#""%""#, "1, true"),
    c("find", r#""a.b""#, r#"".""#, "1, false"),
    c("find", r#""a.b""#, r#"".""#, "1, 0"),
    c("find", r#""a.b""#, r#"".""#, "nil, true"),
    c("find", r#""a.b.c""#, r#"".""#, "3, 'yes'"),
    c("find", r#""abcabc""#, r#""cab""#, ""),
    c("find", r#""abc""#, r#""abcd""#, ""),
    c("find", "string.rep('ab', 1000) .. 'c'", "string.rep('ab', 300) .. 'c'", ""),
    // --- empty subject / pattern --------------------------------------------
    c("find", r#""""#, r#""""#, ""),
    c("match", r#""""#, r#""""#, ""),
    c("gsub", r#""""#, r#""""#, r#""x""#),
    c("find", r#""""#, r#""a""#, ""),
    c("match", r#""""#, r#"".*""#, ""),
    c("find", r#""""#, r#""^$""#, ""),
    c("match", r#""abc""#, r#""""#, ""),
    // --- embedded zero bytes (patterns are C strings in LuaJIT) -------------
    c("find", r#""a\0b""#, r#""\0""#, ""),
    c("find", r#""a\0b""#, r#""b\0""#, ""),
    c("match", r#""a\0b""#, r#""a\0b""#, ""),
    c("match", r#""a\0b""#, r#""%z(.)""#, ""),
    c("gsub", r#""a\0b""#, r#"".""#, r#""x""#),
    c("find", r#""\0\0x""#, r#""%z+""#, ""),
    c("match", r#""x\0y""#, r#""[%z]""#, ""),
    c("gsub", r#""a\0b""#, r#""\0""#, r#""-""#),
    c("find", r#""a\0.b""#, r#""\0.""#, ""),
    c("gmatch", r#""a\0b\0c""#, r#""[^%z]+""#, ""),
    // --- UTF-8 --------------------------------------------------------------
    c("match", r#""\230\151\165\230\156\172\232\170\158""#, r#""[\228-\239][\128-\191]*""#, ""),
    c("gsub", r#""a\195\177b""#, r#""[\192-\255][\128-\191]*""#, r#""?""#),
    c("find", r#""\226\130\172uro""#, r#""uro""#, ""),
    c("match", r#""na\195\175ve""#, r#""%a+""#, ""),
    c("gsub", r#""\226\130\172 5""#, r#"".""#, r#""[%0]""#),
    // --- argument coercion and errors ---------------------------------------
    c("find", "123", r#""2""#, ""),
    c("find", "123.5", r#""%.""#, ""),
    c("match", "1e100", r#""e(.+)""#, ""),
    c("match", "-0.0", r#"".*""#, ""),
    c("gsub", "12345", r#""%d""#, "{['3'] = 'x'}"),
    c("gsub", r#""a98b""#, "98", r#""""#),
    c("find", "nil", r#""x""#, ""),
    c("find", r#""x""#, "{}", ""),
    c("match", "true", r#""x""#, ""),
    c("gmatch", "nil", r#""x""#, ""),
    c("gmatch", r#""x""#, "print", ""),
    c("gsub", "{}", r#""x""#, r#""y""#),
];

/// Free-form cases: any Lua chunk, compared the same way.
const SNIPPETS: &[&str] = &[
    // argument errors: names and method calls as LuaJIT words them
    "return string.find('x')",
    "return string.gsub('x', 'x')",
    "return ('abc'):find('b')",
    "return ('abc'):find(nil)",
    "return ('abc'):gsub()",
    "local t = {find = string.find}; return t:find('x')",
    "local f = string.find; return f(nil, 'x')",
    "return pcall(string.find, nil, 'x')",
    "return pcall(string.find, 'a', '%')",
    "return pcall(string.gsub, 'abc', 'b', true)",
    // error positions follow the calling line
    "\n\nreturn string.match('a', '(')",
    "local s = 'abc'\nlocal ok, e = pcall(function()\n  return s:gsub('b', '%9')\nend)\nreturn ok, e",
    "for w in string.gmatch('abc', '[') do end",
    "local n = 0\nfor w in ('a b'):gmatch('%w') do\n n = n + 1\nend\nreturn n",
    "local s = 'abc'\nlocal a, b = s:find(nil)\nreturn a",
    "local s = 'abc'\nlocal a = s:gsub('b', {}, 'x')\nreturn a",
    "local t = {find = string.find}\nlocal x = t:find('x')\nreturn x",
    "local t = {gsub = string.gsub}\nlocal x = t.gsub(nil)\nreturn x",
    "local f = string.find\nlocal x = f(nil, 'x')\nreturn x",
    "myfind = string.match\nlocal x = myfind('a', '%f')\nreturn x",
    "local x = string.gsub('abc', 'b', '%9')\nreturn x",
    "local x = string.gsub('abc', '%w', function(c) return {} end)\nreturn x",
    "local ok, e = pcall(function()\n  local x = ('a'):match('(')\n  return x\nend)\nreturn ok, e",
    "local function f()\n  local x = string.find('a', '[')\n  return x\nend\nlocal ok, e = pcall(f)\nreturn e",
    // coroutines: positions come from the coroutine's own stack
    "local co = coroutine.wrap(function()\n  local x = string.find('a', '%')\n  return x\nend)\nlocal ok, e = pcall(co)\nreturn ok, e",
    "local co = coroutine.wrap(function()\n  local it = string.gmatch('a b', '%a')\n  coroutine.yield(it())\n  return it()\nend)\nreturn co(), co()",
    "local co = coroutine.wrap(function()\n  return string.gsub('ab', '%w', function(c) coroutine.yield(c) end)\nend)\nlocal ok, e = pcall(co)\nreturn ok, e",
    "return string.gsub('ab', '%w', function(c) return c + {} end)",
    // error values keep their type
    "local ok, e = pcall(string.find, 'a', '[a'); return type(e), e",
    "local ok, e = pcall(string.gsub, 'a', 'a', function() error({code = 7}) end)\nreturn ok, type(e), type(e) == 'table' and e.code",
    "local ok, e = pcall(string.gsub, 'a', 'a', function() error() end); return ok, e",
    // gmatch iterator details
    "local it = string.gmatch('ab', '%w'); local r = pack(it(), it()); return r, select('#', it()), select('#', it())",
    "local it = string.gmatch('ab', '%w'); return type(it), select('#', string.gmatch('a', 'a'))",
    "local t = {}; for k, v in string.gmatch('a=1, b=2', '(%w+)=(%w+)') do t[#t + 1] = k .. v end; return table.concat(t, ';')",
    // re-entrancy: a replacement function that matches again
    "return string.gsub('a1 b2', '(%a)(%d)', function(a, d) return string.rep(a, tonumber(d)) .. (string.match(a, '%a') or '') end)",
    "return string.gsub('abc', '%w', function(c) return string.gsub(c, '.', '%0%0') end)",
    // results count
    "return select('#', string.find('abc', 'x'))",
    "return select('#', string.find('abc', '(b)(c)'))",
    "return select('#', string.match('abc', 'x'))",
    "return select('#', string.gsub('abc', 'x', 'y'))",
    // method syntax on numbers is not available, but coercion in gsub is
    "return string.gsub(1234, 2, 9)",
    "return string.rep('x', 3):gsub('x', '%%')",
];

fn state_with_prelude(patched: bool, check: Option<StepCheck>) -> Lua {
    let lua = Lua::new();
    lua.load(PRELUDE).set_name("=prelude").exec().expect("prelude");
    if patched {
        let string: Table = lua.globals().get("string").expect("string table");
        let check = check.unwrap_or_else(|| Arc::new(|| Ok(())));
        pattern::install(&lua, &string, check).expect("install");
    }
    lua
}

fn run(lua: &Lua, src: &str) -> String {
    let run_case: mlua::Function = lua.globals().get("run_case").expect("run_case");
    match run_case.call::<mlua::LuaString>(src) {
        Ok(s) => String::from_utf8_lossy(&s.as_bytes()).into_owned(),
        Err(e) => format!("HOST ERROR: {e}"),
    }
}

#[test]
fn differential_against_luajit() {
    let orig = state_with_prelude(false, None);
    let patched = state_with_prelude(true, None);
    let mut sources: Vec<String> = CASES.iter().flat_map(Case::sources).collect();
    sources.extend(SNIPPETS.iter().map(|s| s.to_string()));
    assert!(CASES.len() >= 80, "only {} table cases", CASES.len());

    let mut failures = Vec::new();
    for src in &sources {
        let want = run(&orig, src);
        let got = run(&patched, src);
        if std::env::var_os("PATTERN_COMPAT_DUMP").is_some() {
            eprintln!("{src}\n  => {got}");
        }
        if want != got {
            failures.push(format!("case: {src}\n  luajit: {want}\n  port:   {got}"));
        }
    }
    eprintln!(
        "pattern_compat: {} table cases ({} sources) + {} snippets, {} mismatches",
        CASES.len(),
        CASES.len() * 2,
        SNIPPETS.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A Lua string literal for arbitrary bytes.
fn lua_literal(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for b in bytes {
        out.push_str(&format!("\\{b:03}"));
    }
    out.push('"');
    out
}

/// Random small patterns and subjects (well-formed or not), compared between
/// both implementations. Sizes are small enough that the built-ins cannot
/// hang on them. Deterministic: a fixed-seed xorshift generator.
#[test]
fn random_differential() {
    const TOKENS: &[&str] = &[
        "a", "b", ".", "%a", "%d", "%s", "%z", "%A", "%w", "[ab]", "[^a]", "[a-c]", "[%d%s]", "[]a]", "(", ")", "()",
        "%1", "%2", "%b()", "%bab", "%f[%a]", "%f[^%z]", "*", "+", "-", "?", "^", "$", "%", "[", "]", "\0", "x", " ",
    ];
    const SUBJECT_BYTES: &[u8] = b"ab1 ()x\0";
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| -> usize {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let orig = state_with_prelude(false, None);
    let patched = state_with_prelude(true, None);
    let mut failures = Vec::new();
    let rounds = 4000;
    for _ in 0..rounds {
        let mut pat = Vec::new();
        for _ in 0..1 + next(6) {
            pat.extend_from_slice(TOKENS[next(TOKENS.len())].as_bytes());
        }
        let pat: Vec<u8> = String::from_utf8_lossy(&pat).replace("\\0", "\0").into_bytes();
        let subject: Vec<u8> = (0..next(9)).map(|_| SUBJECT_BYTES[next(SUBJECT_BYTES.len())]).collect();
        let (s, p) = (lua_literal(&subject), lua_literal(&pat));
        let src = match next(5) {
            0 => format!("local r = pack(string.find({s}, {p}, {})) return r", next(11) as i64 - 5),
            1 => format!("local r = pack(string.match({s}, {p})) return r"),
            2 => format!("local r = pack(string.gsub({s}, {p}, '<%0|%1>')) return r"),
            3 => format!(
                "local r = pack(string.gsub({s}, {p}, function(...) return select('#', ...) .. tostring((...)) end)) return r"
            ),
            _ => format!("local r = collect(string.gmatch({s}, {p})) return r"),
        };
        let want = run(&orig, &src);
        let got = run(&patched, &src);
        if std::env::var_os("PATTERN_COMPAT_DUMP").is_some() {
            eprintln!("{src}\n  => {got}");
        }
        if want != got {
            failures.push(format!("case: {src}\n  luajit: {want}\n  port:   {got}"));
        }
    }
    eprintln!("random_differential: {rounds} cases, {} mismatches", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Check that the installed functions really are the port: a bomb that would
/// hang the built-ins returns quickly with an always-failing check.
#[test]
fn install_replaces_the_functions() {
    let lua = state_with_prelude(true, Some(Arc::new(|| Err(mlua::Error::runtime("budget")))));
    let err = lua
        .load("return string.find(string.rep('a', 5000), '.-.-.-.-x')")
        .exec()
        .expect_err("the always-failing check must stop the match");
    assert!(err.to_string().contains("budget"), "{err}");
    // Matches that finish in fewer steps than the interval never call the check.
    let r: Option<i64> = lua
        .load("return (string.find('hello', 'l+'))")
        .eval()
        .expect("short match");
    assert_eq!(r, Some(3));
}

/// An error raised by Rust code inside a `gsub` replacement function reaches
/// the host as the same error, as with the built-in `gsub`.
#[test]
fn callback_errors_keep_their_identity() {
    #[derive(Debug)]
    struct Marker;
    impl std::fmt::Display for Marker {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("marker error")
        }
    }
    impl std::error::Error for Marker {}

    for patched in [false, true] {
        let lua = state_with_prelude(patched, None);
        let fail = lua
            .create_function(|_, ()| Err::<(), _>(mlua::Error::external(Marker)))
            .expect("fail");
        lua.globals().set("fail", fail).expect("set");
        let err = lua
            .load("return string.gsub('abc', '%w', function(c) fail() end)")
            .exec()
            .expect_err("must fail");
        assert!(err.downcast_ref::<Marker>().is_some(), "patched={patched}: {err:?}");
        // The same error can be caught and inspected by the script.
        let msg: String = lua
            .load("local ok, e = pcall(string.gsub, 'abc', '%w', function(c) fail() end) return tostring(e)")
            .eval()
            .expect("pcall");
        assert!(msg.contains("marker error"), "patched={patched}: {msg}");
    }
}

const DEADLINE: Duration = Duration::from_millis(50);
const LIMIT: Duration = Duration::from_millis(200);

/// Run `src` in a patched state whose check fails 50 ms after the start;
/// return how long the call took. The call must fail with the check's error.
fn time_bomb(name: &str, src: &str) -> Duration {
    let deadline: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let d = Arc::clone(&deadline);
    let check: StepCheck = Arc::new(move || {
        let due = d.lock().map(|g| *g).unwrap_or(None);
        match due {
            Some(due) if Instant::now() >= due => Err(mlua::Error::runtime("deadline exceeded")),
            _ => Ok(()),
        }
    });
    let lua = state_with_prelude(true, Some(check));
    let chunk = lua.load(src).set_name("=bomb").into_function().expect("compile");
    let start = Instant::now();
    *deadline.lock().expect("lock") = Some(start + DEADLINE);
    let res = chunk.call::<mlua::MultiValue>(());
    let elapsed = start.elapsed();
    eprintln!("bomb {name}: stopped after {:.1} ms", elapsed.as_secs_f64() * 1000.0);
    let err = res.expect_err("the bomb must be stopped by the check");
    assert!(
        err.to_string().contains("deadline exceeded"),
        "{name}: unexpected error {err}"
    );
    assert!(elapsed >= DEADLINE, "{name}: stopped before the deadline ({elapsed:?})");
    assert!(elapsed < LIMIT, "{name}: took {elapsed:?}");
    elapsed
}

#[test]
fn bomb_find() {
    time_bomb("find", "return string.find(string.rep('a', 20000), '.-.-.-.-.-x')");
}

#[test]
fn bomb_match_anchored_greedy() {
    time_bomb(
        "match",
        "return string.match(string.rep('a', 20000), '^(.*)(.*)(.*)(.*)x')",
    );
}

#[test]
fn bomb_gsub() {
    time_bomb("gsub", "return string.gsub(string.rep('a', 20000), '.-.-.-.-.-x', '')");
}

#[test]
fn bomb_gmatch() {
    time_bomb(
        "gmatch",
        "for m in string.gmatch(string.rep('a', 20000), '.-.-.-.-.-x') do end",
    );
}

#[test]
fn bomb_balance() {
    time_bomb(
        "%b + .-",
        "return string.find(string.rep('()', 10000), '%b().-%b().-%b()x')",
    );
    time_bomb("%b scan", "return string.find(string.rep('(', 40000), '%b()')");
}

#[test]
fn bomb_backreference() {
    time_bomb("%1", "return string.find(string.rep('a', 20000) .. 'b', '(.-)%1%1x')");
}

#[test]
fn bomb_inside_pcall_still_stops() {
    time_bomb(
        "pcall(find)",
        "local ok, e = pcall(string.find, string.rep('a', 20000), '.-.-.-.-.-x')\nerror(e, 0)",
    );
}

/// Deep recursion is LuaJIT's "pattern too complex", never a stack overflow,
/// even on a thread with a small stack.
#[test]
fn deep_recursion_is_an_error() {
    let handle = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(|| {
            let lua = state_with_prelude(true, None);
            let cases = [
                "return string.find(string.rep('a', 10000), string.rep('a?', 5000))",
                "return string.match(string.rep('a', 10000), string.rep('a-', 5000) .. 'b')",
                "return string.gsub(string.rep('a', 10000), string.rep('%a*', 5000), '')",
                "for m in string.gmatch(string.rep('a', 10000), string.rep('(a)?', 20)) do end",
            ];
            let mut out = Vec::new();
            for src in cases {
                let r = lua.load(src).set_name("=deep").exec();
                out.push((src, r.map_err(|e| e.to_string())));
            }
            // The pure matcher too.
            let subject = vec![b'a'; 10000];
            let pat = b"a?".repeat(5000);
            let pure = pattern::find_pattern(&subject, &pat, 0, &|| Ok(())).map_err(|e| e.to_string());
            (out, pure)
        })
        .expect("spawn");
    let (results, pure) = handle.join().expect("no stack overflow");
    for (src, r) in &results[..3] {
        let err = r.as_ref().expect_err(src);
        assert!(err.contains("pattern too complex"), "{src}: {err}");
    }
    // 20 optional captures stay well below the limit.
    assert!(results[3].1.is_ok(), "{:?}", results[3]);
    let pure = pure.expect_err("pure matcher");
    assert!(pure.contains("pattern too complex"), "{pure}");
}

/// Rough speed comparison with the built-ins (release build recommended):
/// `cargo test --release --test pattern_compat -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_against_luajit() {
    let bench = r#"
        jit.off() -- as in the sandbox, so both sides run interpreted
        local s = string.rep("The quick brown fox jumps over the lazy dog. ", 2000)
        local t0 = os.clock()
        local n = 0
        for i = 1, 20 do
          for w in s:gmatch("%a+") do n = n + 1 end
          n = n + select(2, s:gsub("(%w+)", "<%1>"))
          n = n + (s:find("lazy cat", 1, true) or 0)
          n = n + #(s:match("^(.-)dog") or "")
          for pos = 1, 2000, 7 do n = n + (s:find("o", pos) or 0) end
        end
        return os.clock() - t0, n
    "#;
    let orig = state_with_prelude(false, None);
    let patched = state_with_prelude(true, None);
    let (t_orig, n_orig): (f64, f64) = orig.load(bench).eval().expect("orig");
    let (t_port, n_port): (f64, f64) = patched.load(bench).eval().expect("port");
    assert_eq!(n_orig, n_port);
    eprintln!(
        "luajit {:.1} ms, port {:.1} ms ({:.2}x)",
        t_orig * 1e3,
        t_port * 1e3,
        t_port / t_orig
    );
}
