//! `llmproxy.sse_parser(max_event_bytes)`: the core's server-sent events
//! rules (`llmproxy_core::http::sse`: where an event ends, what its `data`
//! is, how it is rewritten, the bound on an unfinished event) for a host
//! that relays a stream chunk by chunk (nginx's body filter).
//!
//! ```lua
//! local p = llmproxy.sse_parser(max_event_bytes)
//! local events, datas, n, overflowed = p:push(chunk)  -- datas[i]: the data of
//!                                      -- events[i], or false (no data line)
//! local rest, data = p:finish()        -- an unterminated event, or nil
//! local ev = llmproxy.sse_with_data(event, data)  -- the event, its data replaced
//! local ev = llmproxy.sse_data_event(data)        -- `data: <data>` and a blank line
//! ```

use llmproxy_core::http::sse::{self, SseParser};
use mlua::{Lua, LuaString, MultiValue, Table, UserData, UserDataMethods, Value};

/// One stream's parser. `finish` leaves it empty for the next stream.
pub(crate) struct LuaSseParser {
    parser: SseParser,
    max: usize,
}

/// `llmproxy.sse_parser(max_event_bytes)`.
pub(crate) fn new(_: &Lua, max: Option<u64>) -> mlua::Result<LuaSseParser> {
    let max = max.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
    Ok(LuaSseParser {
        parser: SseParser::with_max(max),
        max,
    })
}

/// `data` of `event` as a Lua value: its text, or false without a data line.
fn data_value(lua: &Lua, event: &[u8]) -> mlua::Result<Value> {
    Ok(match sse::data(event) {
        Some(d) => Value::String(lua.create_string(&*d)?),
        None => Value::Boolean(false),
    })
}

impl UserData for LuaSseParser {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut("push", |lua, this, chunk: LuaString| {
            let events = this.parser.push(&chunk.as_bytes());
            let texts: Table = lua.create_table_with_capacity(events.len(), 0)?;
            let datas: Table = lua.create_table_with_capacity(events.len(), 0)?;
            for (i, event) in events.iter().enumerate() {
                texts.raw_set(i + 1, lua.create_string(event)?)?;
                datas.raw_set(i + 1, data_value(lua, event)?)?;
            }
            Ok((texts, datas, events.len(), this.parser.overflowed()))
        });
        methods.add_method_mut("finish", |lua, this, ()| {
            let parser = std::mem::replace(&mut this.parser, SseParser::with_max(this.max));
            let mut out = MultiValue::new();
            if let Some(rest) = parser.finish() {
                out.push_back(Value::String(lua.create_string(&rest)?));
                out.push_back(data_value(lua, &rest)?);
            }
            Ok(out)
        });
    }
}

/// `llmproxy.sse_with_data(event, data)`.
pub(crate) fn with_data(lua: &Lua, (event, data): (LuaString, LuaString)) -> mlua::Result<LuaString> {
    lua.create_string(sse::with_data(&event.as_bytes(), &data.as_bytes()))
}

/// `llmproxy.sse_data_event(data)`.
pub(crate) fn data_event(lua: &Lua, data: LuaString) -> mlua::Result<LuaString> {
    lua.create_string(sse::data_event(&data.as_bytes()))
}
