//! The helper libraries scripts may use (seed design, "Lua 脚本公共库"):
//! `json`, `string_utils`, `time`, `hash`, `log`, plus the guarded
//! `string.rep`. Every helper is Rust; none can block, touch a file or
//! allocate more than the call's memory allowance.

use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;

use chrono::format::StrftimeItems;
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use md5::Md5;
use mlua::{Lua, LuaString, Table, Value, Variadic};
use sha2::{Digest, Sha256};

use super::context::{context, CallContext, LOG_LINES_PER_CALL, LOG_LINE_MAX_BYTES};
use super::watchdog::Watchdog;
use crate::convert::parse::{self, ParseError};
use crate::convert::{self, Limits, Markers};

/// Default `time.format` output: RFC 3339 in UTC.
const DEFAULT_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Longest format string (and `time.parse` input) the time helpers and
/// `os.date` take. Formatting runs outside the Lua heap in one C or Rust
/// call that the time limit cannot interrupt, so its size is bounded up
/// front: a few hundred bytes of output at most, microseconds of work.
pub(crate) const MAX_TIME_TEXT_BYTES: usize = 256;

/// `s` as UTF-8 text of at most [`MAX_TIME_TEXT_BYTES`] bytes.
fn time_text(what: &str, s: &LuaString) -> mlua::Result<String> {
    let b = s.as_bytes();
    if b.len() > MAX_TIME_TEXT_BYTES {
        return Err(mlua::Error::runtime(format!(
            "{what} is {} bytes, longer than the limit of {MAX_TIME_TEXT_BYTES}",
            b.len()
        )));
    }
    String::from_utf8(b.to_vec()).map_err(|_| mlua::Error::runtime(format!("{what} is not valid UTF-8")))
}

/// What the helpers bound their work by: the call's nesting limit, and as
/// `max_bytes` the bytes its script may still allocate (the idle context's
/// outside a call). Read in place: the context also holds the call's
/// held log lines, which a copy would duplicate on every call of a helper.
fn call_limits(lua: &Lua) -> Limits {
    let of = |c: &CallContext| Limits {
        max_depth: c.limits.max_depth,
        max_bytes: c.memory_allowance,
    };
    match context(lua) {
        Some(c) => of(&c.borrow()),
        None => of(&CallContext::idle()),
    }
}

/// `json` helper table.
pub(crate) fn json(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "encode",
        lua.create_function(|lua, value: Value| {
            let json = convert::lua_to_json(lua, &value, call_limits(lua))
                .map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))?;
            let text = serde_json::to_string(&json).map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))?;
            lua.create_string(text)
        })?,
    )?;
    t.raw_set(
        "decode",
        lua.create_function(|lua, text: LuaString| {
            let limits = call_limits(lua);
            let text = text.as_bytes();
            if text.len() > limits.max_bytes {
                return Err(mlua::Error::MemoryError(format!(
                    "json.decode: a text of {} bytes is larger than the script's memory limit",
                    text.len()
                )));
            }
            // The tree is built outside the Lua heap: it is charged to the
            // script's allowance, and the parse stops at the call's deadline.
            let watchdog = lua.app_data_ref::<Arc<Watchdog>>().map(|w| Arc::clone(&w));
            let deadline = || {
                watchdog
                    .as_ref()
                    .map_or(Ok(()), |w| w.check().map_err(|e| e.to_string()))
            };
            let bounds = parse::Bounds {
                max_depth: limits.max_depth,
                max_memory: limits.max_bytes,
                interrupt: Some(&deadline),
            };
            let value = match parse::parse(&text, &bounds) {
                Ok(v) => v,
                Err(ParseError::Invalid(m)) => return Err(mlua::Error::runtime(format!("json.decode: {m}"))),
                Err(ParseError::Memory(m)) => return Err(mlua::Error::MemoryError(format!("json.decode: {m}"))),
                Err(ParseError::Interrupted(m)) => return Err(mlua::Error::runtime(m)),
            };
            convert::json_to_lua(lua, &value)
        })?,
    )?;
    t.raw_set(
        "array",
        lua.create_function(|lua, t: Option<Table>| {
            let t = match t {
                Some(t) => t,
                None => lua.create_table()?,
            };
            let mt = lua
                .app_data_ref::<Markers>()
                .map(|m| m.array_mt.clone())
                .ok_or_else(|| mlua::Error::runtime("json.array: markers missing"))?;
            // mlua sets metatables raw (it ignores `__metatable`): never
            // replace one this helper did not set. A library proxy, a lazy
            // body or a script's own object keeps its metatable.
            match t.metatable() {
                None => t.set_metatable(Some(mt))?,
                Some(existing) if existing.to_pointer() == mt.to_pointer() => {}
                Some(_) => {
                    return Err(mlua::Error::runtime(
                        "json.array: the table already has a metatable; only a plain table can be marked as an array",
                    ))
                }
            }
            Ok(t)
        })?,
    )?;
    t.raw_set("null", Value::LightUserData(convert::NULL))?;
    t.raw_set("empty_array", Value::LightUserData(convert::EMPTY_ARRAY))?;
    Ok(t)
}

/// Parts `string_utils.split` makes between two checks of the deadline.
const SPLIT_CHECK_EVERY: usize = 4096;

/// `string_utils` helper table.
pub(crate) fn string_utils(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "split",
        lua.create_function(|lua, (s, sep): (LuaString, Option<LuaString>)| {
            let s = s.as_bytes();
            let sep = sep
                .as_ref()
                .map(|x| x.as_bytes().to_vec())
                .unwrap_or_else(|| b",".to_vec());
            if sep.is_empty() {
                return Err(mlua::Error::runtime("string_utils.split: delimiter must not be empty"));
            }
            let parts = lua.create_table()?;
            let watchdog = lua.app_data_ref::<Arc<Watchdog>>().map(|w| Arc::clone(&w));
            let mut start = 0;
            let mut n = 0;
            for pos in memchr::memmem::find_iter(&s, &sep) {
                n += 1;
                // Millions of parts are one uninterruptible call: check the
                // deadline, as the timer's hook does for Lua code.
                if n % SPLIT_CHECK_EVERY == 0 {
                    if let Some(w) = &watchdog {
                        w.check()?;
                    }
                }
                parts.raw_set(n, lua.create_string(&s[start..pos])?)?;
                start = pos + sep.len();
            }
            parts.raw_set(n + 1, lua.create_string(&s[start..])?)?;
            if let Some(m) = lua.app_data_ref::<Markers>() {
                parts.set_metatable(Some(m.array_mt.clone()))?;
            }
            Ok(parts)
        })?,
    )?;
    t.raw_set(
        "trim",
        lua.create_function(|lua, s: LuaString| {
            let b = s.as_bytes();
            let is_space = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
            let start = b.iter().position(|c| !is_space(c)).unwrap_or(b.len());
            let end = b.iter().rposition(|c| !is_space(c)).map_or(start, |p| p + 1);
            lua.create_string(&b[start..end])
        })?,
    )?;
    t.raw_set(
        "starts_with",
        lua.create_function(|_, (s, p): (LuaString, LuaString)| Ok(s.as_bytes().starts_with(&p.as_bytes())))?,
    )?;
    t.raw_set(
        "ends_with",
        lua.create_function(|_, (s, p): (LuaString, LuaString)| Ok(s.as_bytes().ends_with(&p.as_bytes())))?,
    )?;
    Ok(t)
}

fn strftime_items(fmt: &str) -> mlua::Result<Vec<chrono::format::Item<'_>>> {
    let items: Vec<_> = StrftimeItems::new(fmt).collect();
    if items.iter().any(|i| matches!(i, chrono::format::Item::Error)) {
        return Err(mlua::Error::runtime(format!("time: invalid format string '{fmt}'")));
    }
    Ok(items)
}

/// `time` helper table.
pub(crate) fn time(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "now",
        lua.create_function(|_, ()| {
            let now = Utc::now();
            Ok(now.timestamp() as f64 + f64::from(now.timestamp_subsec_millis()) / 1000.0)
        })?,
    )?;
    t.raw_set(
        "format",
        lua.create_function(|_, (ts, fmt): (Option<f64>, Option<LuaString>)| {
            let ts = ts.unwrap_or_else(|| Utc::now().timestamp() as f64);
            if !ts.is_finite() {
                return Err(mlua::Error::runtime("time.format: timestamp must be a finite number"));
            }
            let secs = ts.floor();
            let nanos = ((ts - secs) * 1e9) as u32;
            let dt = Utc
                .timestamp_opt(secs as i64, nanos)
                .single()
                .ok_or_else(|| mlua::Error::runtime(format!("time.format: timestamp {ts} is out of range")))?;
            let fmt = match fmt {
                Some(f) => time_text("time.format: the format", &f)?,
                None => DEFAULT_TIME_FORMAT.to_owned(),
            };
            let items = strftime_items(&fmt)?;
            let mut out = String::new();
            write!(out, "{}", dt.format_with_items(items.into_iter()))
                .map_err(|_| mlua::Error::runtime("time.format: could not format"))?;
            Ok(out)
        })?,
    )?;
    t.raw_set(
        "parse",
        lua.create_function(|_, (s, fmt): (LuaString, Option<LuaString>)| {
            let s = time_text("time.parse: the text", &s)?;
            let fmt = fmt.map(|f| time_text("time.parse: the format", &f)).transpose()?;
            let parsed = match fmt {
                None => DateTime::parse_from_rfc3339(s.trim())
                    .map(|d| d.timestamp())
                    .map_err(|e| e.to_string()),
                Some(fmt) => {
                    strftime_items(&fmt)?;
                    DateTime::parse_from_str(&s, &fmt)
                        .map(|d| d.timestamp())
                        .or_else(|_| NaiveDateTime::parse_from_str(&s, &fmt).map(|d| d.and_utc().timestamp()))
                        .or_else(|_| {
                            NaiveDate::parse_from_str(&s, &fmt)
                                .map(|d| d.and_hms_opt(0, 0, 0).map_or(0, |d| d.and_utc().timestamp()))
                        })
                        .map_err(|e| e.to_string())
                }
            };
            Ok(match parsed {
                Ok(ts) => (Some(ts as f64), None),
                Err(e) => (None, Some(format!("time.parse: cannot parse '{s}': {e}"))),
            })
        })?,
    )?;
    Ok(t)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Bytes hashed between two checks of the call's deadline.
const HASH_CHUNK: usize = 256 << 10;

/// The hex digest of `s`, hashed in chunks with the deadline checked in
/// between: a C-speed loop over megabytes is still one uninterruptible call.
fn digest<D: Digest>(lua: &Lua, s: &LuaString) -> mlua::Result<String> {
    let watchdog = lua.app_data_ref::<Arc<Watchdog>>().map(|w| Arc::clone(&w));
    let bytes = s.as_bytes();
    let mut d = D::new();
    for chunk in bytes.chunks(HASH_CHUNK) {
        if let Some(w) = &watchdog {
            w.check()?;
        }
        d.update(chunk);
    }
    Ok(hex(&d.finalize()))
}

/// `hash` helper table (lowercase hex digests).
pub(crate) fn hash(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("md5", lua.create_function(|lua, s: LuaString| digest::<Md5>(lua, &s))?)?;
    t.raw_set(
        "sha256",
        lua.create_function(|lua, s: LuaString| digest::<Sha256>(lua, &s))?,
    )?;
    Ok(t)
}

/// The level of a script's log line.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Level {
    Info,
    Warn,
    Error,
}

/// Join log arguments like `print` does (tab-separated `tostring`). An error
/// raised by a `__tostring` metamethod (a timeout among them) propagates.
fn log_message(args: &Variadic<Value>) -> mlua::Result<String> {
    let mut msg = String::new();
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            msg.push('\t');
        }
        msg.push_str(&v.to_string()?);
        if msg.len() > LOG_LINE_MAX_BYTES {
            break;
        }
    }
    crate::error::truncate_utf8(&mut msg, LOG_LINE_MAX_BYTES, "…");
    Ok(msg)
}

fn emit(lua: &Lua, level: Level, args: Variadic<Value>) -> mlua::Result<()> {
    let Some(shared) = context(lua).map(|c| Rc::clone(&c)) else {
        return Ok(());
    };
    {
        let mut ctx = shared.borrow_mut();
        ctx.log_lines += 1;
        if ctx.log_lines > LOG_LINES_PER_CALL + 1 {
            return Ok(());
        }
        if ctx.log_lines == LOG_LINES_PER_CALL + 1 {
            let msg = format!("script log limit of {LOG_LINES_PER_CALL} lines per call reached; further lines dropped");
            ctx.log(Level::Warn, msg);
            return Ok(());
        }
    }
    // Not borrowed here: `__tostring` metamethods may log too.
    let msg = log_message(&args)?;
    shared.borrow_mut().log(level, msg);
    Ok(())
}

/// Write one script log line, tagged with the request id, hook and script.
pub(crate) fn write_log_line(ctx: &CallContext, level: Level, msg: &str) {
    let hook = ctx.hook.map_or("-", |h| h.as_str());
    let script = &*ctx.script;
    let request_id = ctx.request_id.as_deref().unwrap_or("-");
    match level {
        Level::Info => {
            tracing::info!(target: "llmproxy::script", request_id = %request_id, hook, script = %script, "{msg}")
        }
        Level::Warn => {
            tracing::warn!(target: "llmproxy::script", request_id = %request_id, hook, script = %script, "{msg}")
        }
        Level::Error => {
            tracing::error!(target: "llmproxy::script", request_id = %request_id, hook, script = %script, "{msg}")
        }
    }
}

/// `log` helper table; lines are tagged with the request id, hook and script.
pub(crate) fn log(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (name, level) in [("info", Level::Info), ("warn", Level::Warn), ("error", Level::Error)] {
        t.raw_set(
            name,
            lua.create_function(move |lua, args: Variadic<Value>| emit(lua, level, args))?,
        )?;
    }
    Ok(t)
}

/// `string.rep` bounded by the call's memory allowance. LuaJIT's own `rep`
/// loops `n` times even when the result is empty (`("").rep("", 1e15)`), and
/// a C function cannot be interrupted by the time limit.
pub(crate) fn string_rep(lua: &Lua) -> mlua::Result<mlua::Function> {
    lua.create_function(|lua, (s, n, sep): (LuaString, f64, Option<LuaString>)| {
        let s = s.as_bytes();
        let sep = sep.as_ref().map(|x| x.as_bytes().to_vec()).unwrap_or_default();
        // NaN, zero and negative counts all give "", like LuaJIT.
        if n.is_nan() || n < 1.0 || (s.is_empty() && sep.is_empty()) {
            return lua.create_string("");
        }
        // Bound the count before any arithmetic that could overflow or turn
        // into NaN (`1/0 * 0`): at most allowance / unit + 1 repetitions fit.
        let allowance = call_limits(lua).max_bytes;
        let unit = s.len() + sep.len();
        let max_count = allowance / unit + 1;
        let total = n.floor() * s.len() as f64 + (n.floor() - 1.0) * sep.len() as f64;
        if n.floor() > max_count as f64 || total > allowance as f64 {
            // A memory error, like the allocator's: the VM is discarded and
            // the sandbox pcall re-raises it.
            return Err(mlua::Error::MemoryError(format!(
                "string.rep: a result of {} bytes is larger than the script's memory limit",
                n.floor() * unit as f64
            )));
        }
        let count = n as usize;
        let unit = [&s[..], &sep[..]].concat();
        let mut out = unit.repeat(count - 1);
        out.extend_from_slice(&s);
        lua.create_string(out)
    })
}

/// `os.date` with its format bounded like `time.format`'s (LuaJIT's runs
/// `strftime` once per conversion, in one uninterruptible C call).
pub(crate) fn os_date(lua: &Lua, raw: mlua::Function) -> mlua::Result<mlua::Function> {
    lua.create_function(move |_, args: mlua::MultiValue| {
        if let Some(Value::String(fmt)) = args.front() {
            time_text("os.date: the format", fmt)?;
        }
        raw.call::<mlua::MultiValue>(args)
    })
}
