//! Lua pattern matching with a step budget: `string.find`, `string.match`,
//! `string.gmatch` and `string.gsub` for the sandbox.
//!
//! # Why this exists
//!
//! Sandboxed scripts get a wall-clock limit that is enforced by a hook
//! (see `watchdog`). Lua hooks only fire between VM instructions, never while a
//! C function runs, and LuaJIT's built-in pattern functions are C functions
//! whose backtracking matcher is exponential in the worst case:
//! `string.find(string.rep("a", 30000), ".-.-.-.-x")` runs for hours and the
//! hook never gets a chance to stop it. This module is a port of the Lua 5.1
//! matcher (as shipped, with small extensions, in LuaJIT 2.1) that counts its
//! work and calls a check function every [`CHECK_INTERVAL`] steps; when the
//! check fails the match is abandoned and the check's error propagates, so a
//! pattern bomb becomes an ordinary Lua error at the deadline instead of a
//! hung worker.
//!
//! # Layers
//!
//! * A pure matcher over bytes ([`find_pattern`] is its public face): no Lua
//!   state involved, only the `check` callback.
//! * [`install`], which replaces `find`, `match`, `gmatch` and `gsub` in a
//!   string library table with functions that behave like LuaJIT 2.1's
//!   (argument coercion, `init` handling, error texts including the
//!   `chunk:line:` prefix, `bad argument` messages, return values).
//!
//! # Compatibility notes (LuaJIT 2.1, built without `LUAJIT_ENABLE_LUA52COMPAT`)
//!
//! * Patterns are C strings: a pattern is cut at its first `\0` (use `%z` to
//!   match a zero byte). Subjects may contain `\0` anywhere. `string.find`'s
//!   plain search (the `plain` argument, or a pattern without any of
//!   `^$*+?.([%-`) uses the whole pattern, zero bytes included.
//! * `init` beyond the end of the subject is clamped to `#s + 1` (no `nil`
//!   result as in Lua 5.2+).
//! * `%g` (printable except space) is a class, as in LuaJIT; character
//!   classes are ASCII only and do not depend on the C locale.
//! * `match` recursion is limited to [`MAX_MATCH_DEPTH`] levels, counted the
//!   way LuaJIT counts them, and exceeding it raises `pattern too complex`
//!   (Lua 5.1 itself would overflow the C stack).
//! * In a `gsub` replacement string, `%` followed by a non-digit inserts that
//!   character, and a trailing `%` inserts a zero byte (Lua 5.1 / LuaJIT
//!   behaviour; Lua 5.2+ raise an error instead).
//! * `gmatch` treats a leading `^` as a literal character, as Lua 5.1 does.
//!
//! Errors that a LuaJIT library function would raise are raised as Lua
//! *strings* (not mlua error userdata), so scripts that `pcall` and inspect
//! them see exactly what they would see with the built-ins. To raise a string
//! error without `unsafe`, the installed functions are small Lua wrappers
//! (chunk `=[string pattern shim]`) around the Rust callbacks. Errors returned
//! by the check callback are not converted: they propagate as the mlua error
//! the callback returned.

use std::borrow::Cow;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua, LuaString, MultiValue, Table, Value};

/// The check callback, shared by every function [`install`] creates. It is
/// called every [`CHECK_INTERVAL`] matcher steps; returning `Err` aborts the
/// match and the error propagates out of the Lua call unchanged.
pub type StepCheck = Arc<dyn Fn() -> mlua::Result<()> + Send + Sync>;

/// Matcher steps between two calls of the check callback. A step is one call
/// of the recursive matcher or one iteration of a loop that scans the subject
/// (repetition expansion, `%b`, back-references and replacement output count
/// in proportion to the bytes they touch).
pub const CHECK_INTERVAL: u32 = 1024;

/// Maximum number of captures in one pattern (`LUA_MAXCAPTURES`).
pub const MAX_CAPTURES: usize = 32;

/// Maximum nesting of the recursive matcher (LuaJIT's `LJ_MAX_XLEVEL`). It
/// also bounds the Rust stack used by a match.
pub const MAX_MATCH_DEPTH: usize = 200;

/// Characters that make `string.find` use the pattern matcher instead of a
/// plain substring search (LuaJIT's `lj_str_haspattern`).
const SPECIALS: &[u8] = b"^$*+?.([%-";

const ERR_TOO_COMPLEX: &str = "pattern too complex";
const ERR_TOO_MANY_CAPTURES: &str = "too many captures";
const ERR_ENDS_WITH_ESC: &str = "malformed pattern (ends with '%')";
const ERR_MISSING_BRACKET: &str = "malformed pattern (missing ']')";
const ERR_FRONTIER: &str = "missing '[' after '%f' in pattern";
const ERR_CAPTURE_INDEX: &str = "invalid capture index";
const ERR_PATTERN_CAPTURE: &str = "invalid pattern capture";
const ERR_UNFINISHED_CAPTURE: &str = "unfinished capture";
const ERR_UNBALANCED: &str = "unbalanced pattern";

/// Name of the Lua chunk holding the thin wrappers [`install`] creates.
const SHIM_NAME: &str = "=[string pattern shim]";

/// The wrappers: each turns `(true, results...)` into `results...` and
/// `(false, err)` into `error(err, 0)`. Only the Rust side computes messages.
const SHIM: &str = r#"
local rfind, rmatch, rgmatch, rgstep, rgsub, error = ...
local function ret(ok, ...)
  if ok then return ... end
  return error((...), 0)
end
local function find(...) return ret(rfind(...)) end
local function match(...) return ret(rmatch(...)) end
local function gsub(...) return ret(rgsub(...)) end
-- The iterator's state (subject, pattern, position) lives in Lua upvalues:
-- a Rust closure per iterator would pin one of mlua's reference slots each,
-- and enough live iterators would exhaust them.
local function gmatch(...)
  local s, p = ret(rgmatch(...))
  local pos = 0
  local function step(ok, nextpos, ...)
    if not ok then return error(nextpos, 0) end
    if nextpos == nil then
      pos = #s + 1
      return
    end
    pos = nextpos
    return ...
  end
  return function() return step(rgstep(s, p, pos)) end
end
return find, match, gmatch, gsub
"#;

/// `t[k]` with metamethods, called through `pcall` so that an error raised by
/// an `__index` metamethod keeps its value.
const INDEX: &str = "return function(t, k) return t[k] end";

// ---------------------------------------------------------------------------
// Pure matcher
// ---------------------------------------------------------------------------

/// One capture of a successful match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    /// A substring capture `(...)`: a byte range of the subject.
    Bytes(Range<usize>),
    /// A position capture `()`: the 0-based byte offset (Lua reports it
    /// 1-based).
    Position(usize),
}

/// A successful match found by [`find_pattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// 0-based offset of the first byte of the match.
    pub start: usize,
    /// 0-based offset one past the last byte of the match.
    pub end: usize,
    /// The pattern's captures, in order; empty when it has none.
    pub captures: Vec<Capture>,
}

/// Find the first match of a Lua pattern in `subject`, starting at byte offset
/// `init` (0-based; clamped to the subject length), like `string.find` with
/// a pattern: a leading `^` anchors the match at `init`, and the pattern is cut
/// at its first zero byte as LuaJIT does.
///
/// `check` is called every [`CHECK_INTERVAL`] steps; its error aborts the
/// search and is returned as is. Malformed patterns, more than
/// [`MAX_CAPTURES`] captures and nesting deeper than [`MAX_MATCH_DEPTH`] give
/// [`mlua::Error::RuntimeError`] with Lua's message (without a position).
pub fn find_pattern(
    subject: &[u8],
    pattern: &[u8],
    init: usize,
    check: &dyn Fn() -> mlua::Result<()>,
) -> mlua::Result<Option<Match>> {
    let (pat, anchor) = split_anchor(c_pattern(pattern));
    let mut m = Matcher::new(subject, pat, check);
    let mut start = init.min(subject.len());
    loop {
        if let Some(end) = m.try_at(start)? {
            let captures = m.captures(None)?;
            return Ok(Some(Match { start, end, captures }));
        }
        if anchor || start >= subject.len() {
            return Ok(None);
        }
        start += 1;
    }
}

/// Why a match stopped early.
#[derive(Debug)]
enum Abort {
    /// An error Lua itself would raise (message without position).
    Lua(Cow<'static, str>),
    /// The check callback failed.
    Check(mlua::Error),
}

impl From<Abort> for mlua::Error {
    fn from(a: Abort) -> Self {
        match a {
            Abort::Lua(msg) => mlua::Error::RuntimeError(msg.into_owned()),
            Abort::Check(e) => e,
        }
    }
}

type MResult<T> = Result<T, Abort>;

fn lua_err<T>(msg: &'static str) -> MResult<T> {
    Err(Abort::Lua(Cow::Borrowed(msg)))
}

/// Counts steps and calls the check every [`CHECK_INTERVAL`] of them.
struct Budget<'c> {
    check: &'c dyn Fn() -> mlua::Result<()>,
    left: u32,
}

impl<'c> Budget<'c> {
    fn new(check: &'c dyn Fn() -> mlua::Result<()>) -> Self {
        Budget {
            check,
            left: CHECK_INTERVAL,
        }
    }

    #[inline]
    fn spend(&mut self, steps: u32) -> MResult<()> {
        if steps < self.left {
            self.left -= steps;
            Ok(())
        } else {
            self.left = CHECK_INTERVAL;
            (self.check)().map_err(Abort::Check)
        }
    }
}

/// Cost in steps of touching `bytes` bytes in one go.
#[inline]
fn bulk_cost(bytes: usize) -> u32 {
    u32::try_from(1 + bytes / 64).unwrap_or(u32::MAX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CapLen {
    Unfinished,
    Position,
    Len(usize),
}

#[derive(Clone, Copy, Debug)]
struct Cap {
    init: usize,
    len: CapLen,
}

/// The state of one match attempt (Lua's `MatchState`) plus the budget,
/// which lives for a whole library call.
struct Matcher<'a, 'c> {
    src: &'a [u8],
    /// The pattern, already cut at its first zero byte and without the
    /// anchor; reading past its end yields 0 like C's terminator.
    pat: &'a [u8],
    level: usize,
    depth: usize,
    caps: [Cap; MAX_CAPTURES],
    budget: Budget<'c>,
}

/// Cut a pattern at its first zero byte, as LuaJIT reads patterns as C strings.
fn c_pattern(p: &[u8]) -> &[u8] {
    match p.iter().position(|&b| b == 0) {
        Some(n) => &p[..n],
        None => p,
    }
}

/// Strip a leading `^` and report whether there was one.
fn split_anchor(p: &[u8]) -> (&[u8], bool) {
    match p.split_first() {
        Some((b'^', rest)) => (rest, true),
        _ => (p, false),
    }
}

// Character classes exactly as LuaJIT's ASCII-only `lj_char_bits` table.
fn is_cntrl(c: u8) -> bool {
    c < 32 || c == 127
}
fn is_space(c: u8) -> bool {
    (9..=13).contains(&c) || c == b' '
}
fn is_punct(c: u8) -> bool {
    matches!(c, 33..=47 | 58..=64 | 91..=96 | 123..=126)
}
fn is_digit(c: u8) -> bool {
    c.is_ascii_digit()
}
fn is_xdigit(c: u8) -> bool {
    c.is_ascii_hexdigit()
}
fn is_lower(c: u8) -> bool {
    c.is_ascii_lowercase()
}
fn is_upper(c: u8) -> bool {
    c.is_ascii_uppercase()
}
fn is_alpha(c: u8) -> bool {
    is_lower(c) || is_upper(c)
}
fn is_alnum(c: u8) -> bool {
    is_alpha(c) || is_digit(c)
}

/// Does `c` belong to the class letter `cl` (the byte after `%`)? Lowercase
/// letters name a class, uppercase its complement; anything else is literal.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => is_alpha(c),
        b'c' => is_cntrl(c),
        b'd' => is_digit(c),
        b'g' => is_alnum(c) || is_punct(c),
        b'l' => is_lower(c),
        b'p' => is_punct(c),
        b's' => is_space(c),
        b'u' => is_upper(c),
        b'w' => is_alnum(c),
        b'x' => is_xdigit(c),
        b'z' => c == 0,
        _ => return cl == c,
    };
    if is_upper(cl) {
        !res
    } else {
        res
    }
}

impl<'a, 'c> Matcher<'a, 'c> {
    fn new(src: &'a [u8], pat: &'a [u8], check: &'c dyn Fn() -> mlua::Result<()>) -> Self {
        Matcher {
            src,
            pat,
            level: 0,
            depth: 0,
            caps: [Cap {
                init: 0,
                len: CapLen::Unfinished,
            }; MAX_CAPTURES],
            budget: Budget::new(check),
        }
    }

    /// Pattern byte at `i`, 0 past the end.
    #[inline]
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// Subject byte at `i`, 0 at (and past) the end, like C's terminator.
    #[inline]
    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    /// Try to match the whole pattern starting exactly at `s`; returns the
    /// end of the match. Captures can be read afterwards.
    fn try_at(&mut self, s: usize) -> MResult<Option<usize>> {
        self.level = 0;
        self.depth = 0;
        self.do_match(s, 0)
    }

    /// Index just past the single-character class starting at `p`.
    fn class_end(&self, p: usize) -> MResult<usize> {
        let c = self.p(p);
        let mut p = p + 1;
        match c {
            b'%' => {
                if self.p(p) == 0 {
                    return lua_err(ERR_ENDS_WITH_ESC);
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                // The first character after `[` or `[^` is always part of
                // the set, even if it is `]`.
                loop {
                    let c = self.p(p);
                    if c == 0 {
                        return lua_err(ERR_MISSING_BRACKET);
                    }
                    p += 1;
                    if c == b'%' && self.p(p) != 0 {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        break;
                    }
                }
                Ok(p + 1)
            }
            _ => Ok(p),
        }
    }

    /// Does `c` match the set `[...]` that starts at `p` (the `[`) and whose
    /// closing `]` is at `ec`?
    fn match_bracket_class(&self, c: u8, p: usize, ec: usize) -> bool {
        let mut p = p;
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            let pc = self.p(p);
            if pc == b'%' {
                p += 1;
                if match_class(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if pc <= c && c <= self.p(p) {
                    return sig;
                }
            } else if pc == c {
                return sig;
            }
        }
    }

    /// Does subject byte `c` match the single-character class `p..ep`?
    fn single_match(&self, c: u8, p: usize, ep: usize) -> bool {
        match self.p(p) {
            b'.' => true,
            b'%' => match_class(c, self.p(p + 1)),
            b'[' => self.match_bracket_class(c, p, ep - 1),
            pc => pc == c,
        }
    }

    /// The recursive matcher: match pattern from `p` against the subject from
    /// `s`, returning the end of the match.
    fn do_match(&mut self, s: usize, p: usize) -> MResult<Option<usize>> {
        self.depth += 1;
        if self.depth > MAX_MATCH_DEPTH {
            return lua_err(ERR_TOO_COMPLEX);
        }
        self.budget.spend(1)?;
        let res = self.match_here(s, p)?;
        self.depth -= 1;
        Ok(res)
    }

    /// Body of [`Self::do_match`]; the loop replaces Lua's tail-call `goto`s
    /// (which do not count towards the depth limit).
    fn match_here(&mut self, mut s: usize, mut p: usize) -> MResult<Option<usize>> {
        loop {
            match self.p(p) {
                b'(' => {
                    return if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, CapLen::Position)
                    } else {
                        self.start_capture(s, p + 1, CapLen::Unfinished)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                0 => return Ok(Some(s)),
                b'$' if self.p(p + 1) == 0 => {
                    return Ok(if s == self.src.len() { Some(s) } else { None });
                }
                b'%' => match self.p(p + 1) {
                    b'b' => match self.match_balance(s, p + 2)? {
                        Some(ns) => {
                            s = ns;
                            p += 4;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    b'f' => {
                        p += 2;
                        if self.p(p) != b'[' {
                            return lua_err(ERR_FRONTIER);
                        }
                        let ep = self.class_end(p)?;
                        let previous = if s == 0 { 0 } else { self.s(s - 1) };
                        if self.match_bracket_class(previous, p, ep - 1)
                            || !self.match_bracket_class(self.s(s), p, ep - 1)
                        {
                            return Ok(None);
                        }
                        p = ep;
                        continue;
                    }
                    d if is_digit(d) => match self.match_capture(s, d)? {
                        Some(ns) => {
                            s = ns;
                            p += 2;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    _ => {}
                },
                _ => {}
            }
            // A single-character class, possibly followed by a repetition.
            let ep = self.class_end(p)?;
            let m = s < self.src.len() && self.single_match(self.src[s], p, ep);
            match self.p(ep) {
                b'?' => {
                    if m {
                        if let Some(r) = self.do_match(s + 1, ep + 1)? {
                            return Ok(Some(r));
                        }
                    }
                    p = ep + 1;
                }
                b'*' => return self.max_expand(s, p, ep),
                b'+' => return if m { self.max_expand(s + 1, p, ep) } else { Ok(None) },
                b'-' => return self.min_expand(s, p, ep),
                _ => {
                    if !m {
                        return Ok(None);
                    }
                    s += 1;
                    p = ep;
                }
            }
        }
    }

    /// `%bxy` at pattern index `p` (pointing at `x`).
    fn match_balance(&mut self, s: usize, p: usize) -> MResult<Option<usize>> {
        let (open, close) = (self.p(p), self.p(p + 1));
        if open == 0 || close == 0 {
            return lua_err(ERR_UNBALANCED);
        }
        if self.s(s) != open {
            return Ok(None);
        }
        let mut depth = 1usize;
        let mut i = s + 1;
        while i < self.src.len() {
            self.budget.spend(1)?;
            let c = self.src[i];
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(i + 1));
                }
            } else if c == open {
                depth += 1;
            }
            i += 1;
        }
        Ok(None)
    }

    /// Greedy repetition (`*`, and `+` after its first character).
    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> MResult<Option<usize>> {
        let mut i = 0usize;
        while s + i < self.src.len() && self.single_match(self.src[s + i], p, ep) {
            self.budget.spend(1)?;
            i += 1;
        }
        loop {
            if let Some(r) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(r));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    /// Lazy repetition (`-`).
    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> MResult<Option<usize>> {
        loop {
            if let Some(r) = self.do_match(s, ep + 1)? {
                return Ok(Some(r));
            }
            if s < self.src.len() && self.single_match(self.src[s], p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: CapLen) -> MResult<Option<usize>> {
        let level = self.level;
        if level >= MAX_CAPTURES {
            return lua_err(ERR_TOO_MANY_CAPTURES);
        }
        self.caps[level] = Cap { init: s, len: what };
        self.level = level + 1;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.level -= 1;
        }
        Ok(res)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> MResult<Option<usize>> {
        let l = self.capture_to_close()?;
        self.caps[l].len = CapLen::Len(s - self.caps[l].init);
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.caps[l].len = CapLen::Unfinished;
        }
        Ok(res)
    }

    fn capture_to_close(&self) -> MResult<usize> {
        (0..self.level)
            .rev()
            .find(|&l| self.caps[l].len == CapLen::Unfinished)
            .map_or_else(|| lua_err(ERR_PATTERN_CAPTURE), Ok)
    }

    /// Back-reference `%1`..`%9` (`d` is the digit byte; `%0` is an error).
    fn match_capture(&mut self, s: usize, d: u8) -> MResult<Option<usize>> {
        let l = usize::from(d).wrapping_sub(usize::from(b'1'));
        if l >= self.level {
            return lua_err(ERR_CAPTURE_INDEX);
        }
        let cap = self.caps[l];
        match cap.len {
            CapLen::Unfinished => lua_err(ERR_CAPTURE_INDEX),
            // A position capture has no text; it never matches (as in C,
            // where its length reads as a huge unsigned number).
            CapLen::Position => Ok(None),
            CapLen::Len(len) => {
                self.budget.spend(bulk_cost(len))?;
                let src = self.src;
                let captured = src.get(cap.init..cap.init.saturating_add(len));
                let here = src.get(s..s.saturating_add(len));
                match (captured, here) {
                    (Some(a), Some(b)) if a == b => Ok(Some(s + len)),
                    _ => Ok(None),
                }
            }
        }
    }

    /// Capture `i` of the last successful match `s..e` (Lua's
    /// `push_onecapture`): with no captures, index 0 is the whole match.
    fn capture(&self, i: usize, s: usize, e: usize) -> MResult<Capture> {
        if i >= self.level {
            if i == 0 {
                Ok(Capture::Bytes(s..e))
            } else {
                lua_err(ERR_CAPTURE_INDEX)
            }
        } else {
            let cap = self.caps[i];
            match cap.len {
                CapLen::Unfinished => lua_err(ERR_UNFINISHED_CAPTURE),
                CapLen::Position => Ok(Capture::Position(cap.init)),
                CapLen::Len(len) => Ok(Capture::Bytes(cap.init..cap.init + len)),
            }
        }
    }

    /// All captures of the last match; with `whole` set and no captures in
    /// the pattern, the whole match (Lua's `push_captures`).
    fn captures(&self, whole: Option<(usize, usize)>) -> MResult<Vec<Capture>> {
        let (s, e) = whole.unwrap_or((0, 0));
        let n = if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        };
        (0..n).map(|i| self.capture(i, s, e)).collect()
    }
}

/// Whether `find` must use the matcher (LuaJIT's `lj_str_haspattern`).
fn has_specials(p: &[u8]) -> bool {
    p.iter().any(|c| SPECIALS.contains(c))
}

/// Plain substring search in linear time: a first-byte scan with direct
/// comparison, switching to Knuth-Morris-Pratt when the comparisons start to
/// cost more than a few passes over the haystack (so it needs no budget).
fn plain_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let Some((&first, rest)) = needle.split_first() else {
        return Some(0);
    };
    if needle.len() > hay.len() {
        return None;
    }
    let last = hay.len() - needle.len();
    let limit = hay.len().saturating_mul(8).saturating_add(4096);
    let mut work = 0usize;
    let mut i = 0usize;
    while i <= last {
        i += hay[i..=last].iter().position(|&b| b == first)?;
        if hay[i + 1..i + needle.len()] == *rest {
            return Some(i);
        }
        work += needle.len();
        i += 1;
        if work > limit {
            return kmp_find(&hay[i..], needle).map(|k| k + i);
        }
    }
    None
}

fn kmp_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    // fail[i]: length of the longest proper border of needle[..=i].
    let mut fail = vec![0usize; needle.len()];
    let mut k = 0usize;
    for i in 1..needle.len() {
        while k > 0 && needle[i] != needle[k] {
            k = fail[k - 1];
        }
        if needle[i] == needle[k] {
            k += 1;
        }
        fail[i] = k;
    }
    let mut k = 0usize;
    for (i, &c) in hay.iter().enumerate() {
        while k > 0 && c != needle[k] {
            k = fail[k - 1];
        }
        if c == needle[k] {
            k += 1;
        }
        if k == needle.len() {
            return Some(i + 1 - k);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Lua bindings
// ---------------------------------------------------------------------------

/// Replace `find`, `match`, `gmatch` and `gsub` in `string_table` with
/// budgeted versions that behave like LuaJIT 2.1's built-ins.
///
/// `check` is called every [`CHECK_INTERVAL`] matcher steps while one of these
/// functions runs; if it returns an error, the running call stops and that
/// error propagates (as an mlua error value) to whoever called into Lua.
///
/// Must be called while the base library's `pcall` and `error` are still
/// global: they are captured here (`gsub` calls replacement functions and
/// `__index` metamethods through `pcall` so that their errors keep their
/// value, and the wrappers raise with `error`).
pub fn install(lua: &Lua, string_table: &Table, check: StepCheck) -> mlua::Result<()> {
    let globals = lua.globals();
    let base_fn = |name: &str| -> mlua::Result<Function> {
        match globals.raw_get::<Value>(name)? {
            Value::Function(f) => Ok(f),
            _ => Err(mlua::Error::runtime(format!(
                "pattern::install needs the base library function `{name}` in the globals"
            ))),
        }
    };
    let pcall = base_fn("pcall")?;
    let error = base_fn("error")?;
    let index: Function = lua.load(INDEX).set_name(SHIM_NAME).eval()?;
    // `Rc`: the callbacks live in this Lua state, which moves between
    // threads only as a whole (see `vm::Vm`'s `Send`).
    let shared = Rc::new(Shared { check, pcall, index });

    let sh = Rc::clone(&shared);
    let rfind =
        lua.create_function(move |lua, mut args: MultiValue| finish(str_find_aux(lua, &mut args, &sh, true)))?;
    let sh = Rc::clone(&shared);
    let rmatch =
        lua.create_function(move |lua, mut args: MultiValue| finish(str_find_aux(lua, &mut args, &sh, false)))?;
    let rgmatch = lua.create_function(move |lua, mut args: MultiValue| finish(str_gmatch(lua, &mut args)))?;
    let sh = Rc::clone(&shared);
    let rgstep = lua.create_function(move |lua, args: (LuaString, LuaString, usize)| {
        finish(gmatch_step(lua, &args.0, &args.1, args.2, &sh))
    })?;
    let sh = shared;
    let rgsub = lua.create_function(move |lua, mut args: MultiValue| finish(str_gsub(lua, &mut args, &sh)))?;

    let (find, match_, gmatch, gsub): (Function, Function, Function, Function) = lua
        .load(SHIM)
        .set_name(SHIM_NAME)
        .call((rfind, rmatch, rgmatch, rgstep, rgsub, error))?;
    string_table.set("find", find)?;
    string_table.set("match", match_)?;
    string_table.set("gmatch", gmatch)?;
    string_table.set("gsub", gsub)?;
    Ok(())
}

/// What the Rust callbacks share.
struct Shared {
    check: StepCheck,
    pcall: Function,
    index: Function,
}

/// How a binding failed.
enum Fail {
    /// Raise this value from the wrapper, as LuaJIT would (a message with its
    /// position already prepended, or an error value to re-raise as is).
    Raise(Value),
    /// Return this error from the Rust callback (check failures and mlua
    /// errors such as running out of memory).
    Host(mlua::Error),
}

impl From<mlua::Error> for Fail {
    fn from(e: mlua::Error) -> Self {
        Fail::Host(e)
    }
}

type BResult<T> = Result<T, Fail>;

/// Encode a binding result for the Lua wrapper: `(true, results...)` or
/// `(false, error value)`.
fn finish(res: BResult<MultiValue>) -> mlua::Result<MultiValue> {
    match res {
        Ok(mut values) => {
            values.push_front(Value::Boolean(true));
            Ok(values)
        }
        Err(Fail::Raise(v)) => Ok(MultiValue::from_vec(vec![Value::Boolean(false), v])),
        Err(Fail::Host(e)) => Err(e),
    }
}

/// The `chunk:line: ` prefix LuaJIT adds to errors raised by a library
/// function: the position of the Lua code that called it. Level 0 is the Rust
/// callback, level 1 its Lua wrapper, level 2 the caller.
fn location(lua: &Lua) -> String {
    lua.inspect_stack(2, |d| {
        let src = d.source();
        if src.what == "C" {
            return None;
        }
        let line = d.current_line()?;
        Some(format!("{}:{}: ", src.short_src.as_deref().unwrap_or("?"), line))
    })
    .flatten()
    .unwrap_or_default()
}

/// A Lua error with LuaJIT's position prefix.
fn raise(lua: &Lua, msg: &str) -> Fail {
    let full = format!("{}{}", location(lua), msg);
    match lua.create_string(full) {
        Ok(s) => Fail::Raise(Value::String(s)),
        Err(e) => Fail::Host(e),
    }
}

fn abort(lua: &Lua, a: Abort) -> Fail {
    match a {
        Abort::Lua(msg) => raise(lua, &msg),
        Abort::Check(e) => Fail::Host(e),
    }
}

/// `bad argument #n to 'name' (msg)`, with LuaJIT's method adjustment.
fn arg_error(lua: &Lua, narg: usize, msg: &str) -> Fail {
    let (name, method) = lua
        .inspect_stack(1, |d| {
            let names = d.names();
            (names.name.map(|n| n.into_owned()), names.name_what == Some("method"))
        })
        .unwrap_or((None, false));
    let name = name.unwrap_or_else(|| "?".to_owned());
    let text = if method && narg == 1 {
        format!("calling '{name}' on bad self ({msg})")
    } else {
        let narg = if method { narg - 1 } else { narg };
        format!("bad argument #{narg} to '{name}' ({msg})")
    };
    raise(lua, &text)
}

/// Lua's type name of a value, as LuaJIT prints it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) => "userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        Value::UserData(_) | Value::Error(_) => "userdata",
        _ => "cdata",
    }
}

fn type_error(lua: &Lua, narg: usize, expected: &str, got: Option<&Value>) -> Fail {
    let got = got.map_or("no value", type_name);
    arg_error(lua, narg, &format!("{expected} expected, got {got}"))
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Nil | Value::Boolean(false))
}

/// A string argument; numbers are converted as Lua does. The argument is
/// moved out of `args` (saving a reference copy on every call).
fn check_string(lua: &Lua, args: &mut MultiValue, narg: usize) -> BResult<LuaString> {
    match args.get_mut(narg - 1).map(std::mem::take) {
        Some(Value::String(s)) => Ok(s),
        Some(v @ (Value::Integer(_) | Value::Number(_))) => match lua.coerce_string(v.clone())? {
            Some(s) => Ok(s),
            None => Err(type_error(lua, narg, "string", Some(&v))),
        },
        other => Err(type_error(lua, narg, "string", other.as_ref())),
    }
}

/// An optional number argument (numbers or numeric strings), `None` if absent
/// or nil.
fn opt_number(lua: &Lua, args: &MultiValue, narg: usize) -> BResult<Option<f64>> {
    match args.get(narg - 1) {
        None | Some(Value::Nil) => Ok(None),
        // LuaJIT numbers are doubles; mlua reports integral ones as integers.
        Some(Value::Integer(i)) => Ok(Some(*i as f64)),
        Some(Value::Number(n)) => Ok(Some(*n)),
        Some(v) => match lua.coerce_number(v.clone())? {
            Some(n) => Ok(Some(n)),
            None => Err(type_error(lua, narg, "number", Some(v))),
        },
    }
}

/// C's `(int32_t)` conversion of a double as LuaJIT's `lj_lib_optint` does it:
/// truncation; out-of-range values give the x86 "integer indefinite".
fn c_double_to_i32(x: f64) -> i32 {
    if cfg!(any(target_arch = "x86", target_arch = "x86_64")) && !(x > -2147483649.0 && x < 2147483648.0) {
        i32::MIN
    } else {
        x as i32
    }
}

/// C's `(int)(ptrdiff_t)` conversion of a double, as `luaL_optint` does it
/// (so `2^32 + 1` becomes 1 and `1e20` becomes 0 on x86-64).
fn c_double_to_int_via_i64(x: f64) -> i32 {
    let wide = if cfg!(any(target_arch = "x86", target_arch = "x86_64"))
        && !(-9223372036854775808.0..9223372036854775808.0).contains(&x)
    {
        i64::MIN
    } else {
        x as i64
    };
    wide as i32
}

fn capture_value(lua: &Lua, src: &[u8], cap: Capture) -> mlua::Result<Value> {
    Ok(match cap {
        Capture::Bytes(r) => Value::String(lua.create_string(&src[r])?),
        Capture::Position(p) => Value::Integer(pos_value(p + 1)),
    })
}

fn pos_value(p: usize) -> mlua::Integer {
    mlua::Integer::try_from(p).unwrap_or(mlua::Integer::MAX)
}

fn capture_values(lua: &Lua, src: &[u8], caps: Vec<Capture>) -> mlua::Result<Vec<Value>> {
    caps.into_iter().map(|c| capture_value(lua, src, c)).collect()
}

/// `string.find` (`find == true`) and `string.match`.
fn str_find_aux(lua: &Lua, args: &mut MultiValue, sh: &Shared, find: bool) -> BResult<MultiValue> {
    let s = check_string(lua, args, 1)?;
    let p = check_string(lua, args, 2)?;
    let init = opt_number(lua, args, 3)?.map_or(1, c_double_to_i32);
    let src = s.as_bytes();
    let pat_full = p.as_bytes();
    let len = src.len();

    let len_i = i64::try_from(len).unwrap_or(i64::MAX);
    let mut start = i64::from(init);
    if start < 0 {
        start += len_i;
    } else {
        start -= 1;
    }
    let st = usize::try_from(start.clamp(0, len_i)).unwrap_or(len);

    let plain = args.get(3).is_some_and(truthy);
    if find && (plain || !has_specials(&pat_full)) {
        return Ok(match plain_find(&src[st..], &pat_full) {
            Some(q) => MultiValue::from_vec(vec![
                Value::Integer(pos_value(st + q + 1)),
                Value::Integer(pos_value(st + q + pat_full.len())),
            ]),
            None => MultiValue::from_vec(vec![Value::Nil]),
        });
    }

    let (pat, anchor) = split_anchor(c_pattern(&pat_full));
    let check: &dyn Fn() -> mlua::Result<()> = &*sh.check;
    let mut m = Matcher::new(&src, pat, check);
    let mut sstr = st;
    loop {
        if let Some(e) = m.try_at(sstr).map_err(|a| abort(lua, a))? {
            let mut out = Vec::new();
            let caps = if find {
                out.push(Value::Integer(pos_value(sstr + 1)));
                out.push(Value::Integer(pos_value(e)));
                m.captures(None)
            } else {
                m.captures(Some((sstr, e)))
            };
            let caps = caps.map_err(|a| abort(lua, a))?;
            out.extend(capture_values(lua, &src, caps)?);
            return Ok(MultiValue::from_vec(out));
        }
        if anchor || sstr >= len {
            break;
        }
        sstr += 1;
    }
    Ok(MultiValue::from_vec(vec![Value::Nil]))
}

/// `string.gmatch`: checks and coerces the arguments; the Lua wrapper builds
/// the iterator around [`gmatch_step`].
fn str_gmatch(lua: &Lua, args: &mut MultiValue) -> BResult<MultiValue> {
    let s = check_string(lua, args, 1)?;
    let p = check_string(lua, args, 2)?;
    Ok(MultiValue::from_vec(vec![Value::String(s), Value::String(p)]))
}

/// One call of a `gmatch` iterator from position `pos`: the next position
/// followed by the captures, or nothing once exhausted. An empty match
/// advances the position by one so that the loop always makes progress.
fn gmatch_step(lua: &Lua, s: &LuaString, p: &LuaString, pos: usize, sh: &Shared) -> BResult<MultiValue> {
    let src = s.as_bytes();
    let pat_full = p.as_bytes();
    let pat = c_pattern(&pat_full);
    let check: &dyn Fn() -> mlua::Result<()> = &*sh.check;
    let mut m = Matcher::new(&src, pat, check);
    let mut i = pos;
    while i <= src.len() {
        if let Some(e) = m.try_at(i).map_err(|a| abort(lua, a))? {
            let next = if e == i { e + 1 } else { e };
            let caps = m.captures(Some((i, e))).map_err(|a| abort(lua, a))?;
            let mut values = capture_values(lua, &src, caps)?;
            values.insert(
                0,
                Value::Integer(mlua::Integer::try_from(next).unwrap_or(mlua::Integer::MAX)),
            );
            return Ok(MultiValue::from_vec(values));
        }
        i += 1;
    }
    Ok(MultiValue::new())
}

/// The replacement argument of `gsub`.
enum Repl {
    Str(LuaString),
    Table(Table),
    Func(Function),
}

/// `string.gsub`.
fn str_gsub(lua: &Lua, args: &mut MultiValue, sh: &Shared) -> BResult<MultiValue> {
    let s = check_string(lua, args, 1)?;
    let p = check_string(lua, args, 2)?;
    let src = s.as_bytes();
    let pat_full = p.as_bytes();
    let default_max = i64::try_from(src.len()).unwrap_or(i64::MAX).saturating_add(1);
    // `(int)(srcl+1)` in C; subjects are far below 2^31 bytes in practice.
    let max_s = match opt_number(lua, args, 4)? {
        Some(n) => i64::from(c_double_to_int_via_i64(n)),
        None => default_max,
    };
    let repl = match args.get_mut(2).map(std::mem::take) {
        Some(Value::String(r)) => Repl::Str(r),
        Some(v @ (Value::Integer(_) | Value::Number(_))) => match lua.coerce_string(v)? {
            Some(r) => Repl::Str(r),
            None => return Err(arg_error(lua, 3, "string/function/table expected")),
        },
        Some(Value::Table(t)) => Repl::Table(t),
        Some(Value::Function(f)) => Repl::Func(f),
        _ => return Err(arg_error(lua, 3, "string/function/table expected")),
    };
    let repl_bytes = match &repl {
        Repl::Str(r) => Some(r.as_bytes()),
        _ => None,
    };

    let (pat, anchor) = split_anchor(c_pattern(&pat_full));
    let check: &dyn Fn() -> mlua::Result<()> = &*sh.check;
    let mut m = Matcher::new(&src, pat, check);
    let mut out: Vec<u8> = Vec::with_capacity(src.len());
    // The result is built outside the Lua allocator: bound it by what the
    // script may still allocate, so `gsub` cannot amplify past the limit.
    let max_out = super::context::context(lua).map_or(usize::MAX, |c| c.borrow().memory_allowance);
    let too_big = || {
        Fail::Host(mlua::Error::MemoryError(format!(
            "string.gsub: the result is larger than the script's memory limit of {max_out} bytes"
        )))
    };
    let mut pos = 0usize;
    let mut n: i64 = 0;
    while n < max_s {
        let e = m.try_at(pos).map_err(|a| abort(lua, a))?;
        if let Some(e) = e {
            n += 1;
            let before = out.len();
            match (&repl, &repl_bytes) {
                (_, Some(r)) => add_s(&m, r, pos, e, &mut out).map_err(|a| abort(lua, a))?,
                (Repl::Table(t), _) => {
                    let key = m.capture(0, pos, e).map_err(|a| abort(lua, a))?;
                    let key = capture_value(lua, &src, key)?;
                    let v = protected_call(&sh.pcall, &sh.index, vec![Value::Table(t.clone()), key])?;
                    add_value(lua, &src[pos..e], v, &mut out)?;
                }
                (Repl::Func(f), _) => {
                    let caps = m.captures(Some((pos, e))).map_err(|a| abort(lua, a))?;
                    let caps = capture_values(lua, &src, caps)?;
                    let v = protected_call(&sh.pcall, f, caps)?;
                    add_value(lua, &src[pos..e], v, &mut out)?;
                }
                (Repl::Str(_), None) => {}
            }
            m.budget
                .spend(bulk_cost(out.len() - before))
                .map_err(|a| abort(lua, a))?;
            if out.len() > max_out {
                return Err(too_big());
            }
        }
        match e {
            Some(e) if e > pos => pos = e,
            _ if pos < src.len() => {
                out.push(src[pos]);
                pos += 1;
            }
            _ => break,
        }
        if anchor {
            break;
        }
    }
    out.extend_from_slice(&src[pos..]);
    if out.len() > max_out {
        return Err(too_big());
    }
    Ok(MultiValue::from_vec(vec![
        Value::String(lua.create_string(&out)?),
        Value::Integer(mlua::Integer::try_from(n).unwrap_or(mlua::Integer::MAX)),
    ]))
}

/// Expand a replacement string (`%0`-`%9`, `%x` for a literal `x`).
fn add_s(m: &Matcher<'_, '_>, repl: &[u8], s: usize, e: usize, out: &mut Vec<u8>) -> MResult<()> {
    let src = m.src;
    let mut i = 0usize;
    while i < repl.len() {
        let c = repl[i];
        if c != b'%' {
            out.push(c);
        } else {
            i += 1;
            // Past the end this reads C's terminating zero byte.
            let d = repl.get(i).copied().unwrap_or(0);
            if !is_digit(d) {
                out.push(d);
            } else if d == b'0' {
                out.extend_from_slice(&src[s..e]);
            } else {
                match m.capture(usize::from(d - b'1'), s, e)? {
                    Capture::Bytes(r) => out.extend_from_slice(&src[r]),
                    Capture::Position(p) => out.extend_from_slice((p + 1).to_string().as_bytes()),
                }
            }
        }
        i += 1;
    }
    Ok(())
}

/// Call `f(args...)` through `pcall`; an error is re-raised with its
/// original value. Returns the first result (or nil).
fn protected_call(pcall: &Function, f: &Function, args: Vec<Value>) -> BResult<Value> {
    let mut call_args = Vec::with_capacity(args.len() + 1);
    call_args.push(Value::Function(f.clone()));
    call_args.extend(args);
    let mut results = pcall.call::<MultiValue>(MultiValue::from_vec(call_args))?.into_iter();
    let ok = results.next().is_some_and(|v| truthy(&v));
    let first = results.next().unwrap_or(Value::Nil);
    if ok {
        Ok(first)
    } else {
        Err(Fail::Raise(first))
    }
}

/// Append the value a table or function replacement produced.
fn add_value(lua: &Lua, whole: &[u8], v: Value, out: &mut Vec<u8>) -> BResult<()> {
    match v {
        Value::Nil | Value::Boolean(false) => out.extend_from_slice(whole),
        Value::String(s) => out.extend_from_slice(&s.as_bytes()),
        v @ (Value::Integer(_) | Value::Number(_)) => match lua.coerce_string(v)? {
            Some(s) => out.extend_from_slice(&s.as_bytes()),
            None => return Err(raise(lua, "invalid replacement value (a number)")),
        },
        other => {
            return Err(raise(
                lua,
                &format!("invalid replacement value (a {})", type_name(&other)),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> mlua::Result<()> {
        Ok(())
    }

    #[test]
    fn plain_find_matches_naive() {
        let hay = b"abababababcabababc";
        for needle in [&b"abc"[..], b"ababc", b"c", b"", b"x", b"abababababcabababc", b"bca"] {
            let naive = (0..=hay.len().saturating_sub(needle.len()))
                .find(|&i| hay.len() >= needle.len() && &hay[i..i + needle.len()] == needle);
            assert_eq!(plain_find(hay, needle), naive, "{needle:?}");
            assert_eq!(kmp_find(hay, needle), naive);
        }
    }

    #[test]
    fn plain_find_is_linear_on_adversarial_input() {
        let hay = vec![b'a'; 1 << 20];
        let mut needle = vec![b'a'; 1 << 16];
        needle.push(b'b');
        let t = std::time::Instant::now();
        assert_eq!(plain_find(&hay, &needle), None);
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn pure_find_pattern() {
        let m = find_pattern(b"hello world", b"(o)()", 0, &ok).unwrap().unwrap();
        assert_eq!(m.start, 4);
        assert_eq!(m.end, 5);
        assert_eq!(m.captures, vec![Capture::Bytes(4..5), Capture::Position(5)]);
        assert!(find_pattern(b"abc", b"^b", 0, &ok).unwrap().is_none());
        assert!(find_pattern(b"abc", b"^b", 1, &ok).unwrap().is_some());
        match find_pattern(b"abc", b"%", 0, &ok) {
            Err(mlua::Error::RuntimeError(msg)) => {
                assert_eq!(msg, "malformed pattern (ends with '%')")
            }
            other => panic!("unexpected {other:?}"),
        }
        // The check's own error comes back unchanged.
        let fail = || Err(mlua::Error::runtime("stop"));
        let subject = vec![b'a'; 5000];
        match find_pattern(&subject, b".-.-.-x", 0, &fail) {
            Err(mlua::Error::RuntimeError(msg)) => assert_eq!(msg, "stop"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
