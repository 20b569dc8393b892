//! The LuaJIT module: `local llmproxy = require "llmproxy"`.
//!
//! ```lua
//! local llmproxy = require "llmproxy"
//! local engine, err = llmproxy.new(config)   -- YAML text or a file path
//! local res, err = engine:run("routing", { request = req, backends = bs })
//! local list = engine:backends()             -- the config's backends
//! -- res: the script's result as a Lua value; nil, nil when it returned nil;
//! -- nil, err on failure, err = { kind = ..., message = ..., hook = ...,
//! -- script = ..., line = ... } with a __tostring.
//! ```
//!
//! Exports: `new`, `version`, `null` (`json.null`, a NULL light userdata,
//! equal to `cjson.null`), `empty_array`, `array_mt`.
//!
//! The module runs in the host's Lua state (mlua `module` mode: LuaJIT comes
//! from the host); scripts run in the engine's own sandbox states, never in
//! the host's. `input.request.body_raw` may hold the request body as JSON
//! text, so the body is parsed once, in Rust, rather than converted from a
//! Lua table.

pub mod convert;

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use llmproxy_core::{Config, Engine, HookName};
use mlua::{Lua, MetaMethod, MultiValue, Table, UserData, UserDataMethods, Value};
use serde_json::Value as Json;

use crate::capi::boundary::from_panic;
use crate::capi::error::Failure;
use convert::{ToJson, EMPTY_ARRAY};

/// Tables the module's functions share.
#[derive(Clone)]
struct Shared {
    /// `llmproxy.array_mt`: marks arrays (results carry it; inputs may).
    array_mt: Table,
    /// Metatable of error tables (`__tostring`).
    err_mt: Table,
}

impl Shared {
    /// `nil, err` with err a `{kind, message, hook?, script?, line?}` table.
    fn fail(&self, lua: &Lua, f: Failure) -> mlua::Result<MultiValue> {
        let t = lua.create_table_with_capacity(0, 5)?;
        t.raw_set("kind", f.code.kind().to_str().unwrap_or("internal"))?;
        t.raw_set("message", f.message)?;
        if let Some(h) = f.hook {
            t.raw_set("hook", h.as_str())?;
        }
        if let Some(s) = f.script {
            t.raw_set("script", s)?;
        }
        if let Some(l) = f.line {
            t.raw_set("line", l)?;
        }
        t.set_metatable(Some(self.err_mt.clone()))?;
        Ok(MultiValue::from_vec(vec![Value::Nil, Value::Table(t)]))
    }
}

/// An engine as a Lua userdata (`engine:run(hook, input)`).
struct LuaEngine {
    engine: Engine,
    shared: Shared,
}

impl UserData for LuaEngine {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("run", |lua, this, (hook, input): (Value, Value)| {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| run(this, &hook, &input)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match outcome {
                Ok(json) => {
                    let value = match json {
                        Json::Null => Value::Nil,
                        other => convert::to_lua(lua, &other, &this.shared.array_mt)?,
                    };
                    Ok(MultiValue::from_vec(vec![value, Value::Nil]))
                }
                Err(f) => this.shared.fail(lua, f),
            }
        });
        methods.add_method("backends", |lua, this, ()| backends(lua, this));
        methods.add_method("enabled", |_, this, hook: String| {
            Ok(hook.parse::<HookName>().is_ok_and(|h| this.engine.is_enabled(h)))
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("llmproxy.engine"));
    }
}

/// `engine:backends()`: the config's backends, in config order, as
/// `{ {name=, url=, weight=, headers={...}}, ... }` (an array).
fn backends(lua: &Lua, this: &LuaEngine) -> mlua::Result<Table> {
    let list = &this.engine.config().backends;
    let t = lua.create_table_with_capacity(list.len(), 0)?;
    for (i, b) in list.iter().enumerate() {
        let item = lua.create_table_with_capacity(0, 4)?;
        item.raw_set("name", b.name.as_str())?;
        item.raw_set("url", b.url.as_str())?;
        item.raw_set("weight", b.weight)?;
        let headers = lua.create_table_with_capacity(0, b.headers.len())?;
        for (k, v) in &b.headers {
            headers.raw_set(k.as_str(), v.as_str())?;
        }
        item.raw_set("headers", headers)?;
        t.raw_set(i + 1, item)?;
    }
    t.set_metatable(Some(this.shared.array_mt.clone()))?;
    Ok(t)
}

/// `engine:run` without the Lua plumbing: input to JSON, run, result.
fn run(this: &LuaEngine, hook: &Value, input: &Value) -> Result<Json, Failure> {
    let Value::String(hook) = hook else {
        return Err(Failure::invalid(format!(
            "hook must be a string, got {}",
            hook.type_name()
        )));
    };
    let hook = hook.to_str().map_err(|_| Failure::invalid("hook is not valid UTF-8"))?;
    let hook: HookName = hook
        .parse()
        .map_err(|e: String| Failure::invalid(format!("hook: {e}")))?;
    let Some(cfg) = this.engine.config().hook(hook) else {
        return Err(Failure::invalid(format!(
            "hook: the {hook} hook is not enabled in this engine"
        )));
    };
    let max_depth = cfg.limits.max_depth.saturating_add(1);
    let value = match input {
        // JSON text: parsed once, in Rust.
        Value::String(s) => {
            let limits = llmproxy_core::convert::Limits {
                max_depth,
                max_bytes: cfg.limits.max_input_bytes,
            };
            llmproxy_core::convert::parse_json(&s.as_bytes(), limits)
                .map_err(|e| Failure::invalid(format!("input: {e}")))?
        }
        Value::Table(_) => ToJson {
            array_mt: &this.shared.array_mt,
            max_depth,
        }
        .convert(input)
        .map_err(|e| Failure::invalid(e.describe("input")))?,
        other => {
            return Err(Failure::invalid(format!(
                "input must be a table of the hook's globals (or JSON text), got {}",
                other.type_name()
            )))
        }
    };
    Ok(this.engine.run_json(hook, &value)?)
}

/// Where a `llmproxy.new` argument says the config is.
enum Source {
    Yaml(String),
    File(String),
}

fn source(cfg: &Value) -> Result<Source, Failure> {
    let text = |v: &Value, what: &str| -> Result<String, Failure> {
        match v {
            Value::String(s) => s
                .to_str()
                .map(|s| s.to_owned())
                .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8"))),
            other => Err(Failure::invalid(format!(
                "{what} must be a string, got {}",
                other.type_name()
            ))),
        }
    };
    match cfg {
        Value::String(_) => {
            let s = text(cfg, "config")?;
            // One line without a ':' cannot be a useful YAML config: it is a
            // path. So is any one line that names an existing file.
            let one_line = !s.contains('\n');
            if one_line && (!s.contains(':') || Path::new(&s).is_file()) {
                Ok(Source::File(s))
            } else {
                Ok(Source::Yaml(s))
            }
        }
        Value::Table(t) => {
            let yaml: Value = t.raw_get("yaml").map_err(|e| Failure::invalid(e.to_string()))?;
            let file: Value = t.raw_get("file").map_err(|e| Failure::invalid(e.to_string()))?;
            match (yaml.is_nil(), file.is_nil()) {
                (false, true) => Ok(Source::Yaml(text(&yaml, "config.yaml")?)),
                (true, false) => Ok(Source::File(text(&file, "config.file")?)),
                _ => Err(Failure::invalid("config table needs exactly one of 'yaml' and 'file'")),
            }
        }
        other => Err(Failure::invalid(format!(
            "config must be YAML text, a file path or {{yaml=...}} / {{file=...}}, got {}",
            other.type_name()
        ))),
    }
}

fn build(cfg: &Value) -> Result<Engine, Failure> {
    let config = match source(cfg)? {
        Source::Yaml(text) => Config::from_yaml(&text, Path::new("."))?,
        Source::File(path) => Config::from_file(path)?,
    };
    Ok(Engine::new(config)?)
}

/// The module table (`luaopen_llmproxy`).
#[mlua::lua_module(name = "llmproxy")]
fn llmproxy(lua: &Lua) -> mlua::Result<Table> {
    let array_mt = lua.create_table()?;
    array_mt.raw_set("__name", "llmproxy.array")?;
    let err_mt = lua.create_table()?;
    err_mt.raw_set(
        "__tostring",
        lua.create_function(|_, e: Table| {
            let kind: String = e.raw_get("kind")?;
            let message: String = e.raw_get("message")?;
            Ok(format!("{kind}: {message}"))
        })?,
    )?;
    let shared = Shared {
        array_mt: array_mt.clone(),
        err_mt,
    };

    let exports = lua.create_table()?;
    exports.raw_set("version", llmproxy_core::VERSION)?;
    exports.raw_set("null", Value::NULL)?;
    exports.raw_set("empty_array", Value::LightUserData(EMPTY_ARRAY))?;
    exports.raw_set("array_mt", array_mt)?;
    exports.raw_set(
        "new",
        lua.create_function(move |lua, cfg: Value| {
            let built = panic::catch_unwind(AssertUnwindSafe(|| build(&cfg)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match built {
                Ok(engine) => {
                    let ud = lua.create_userdata(LuaEngine {
                        engine,
                        shared: shared.clone(),
                    })?;
                    Ok(MultiValue::from_vec(vec![Value::UserData(ud)]))
                }
                Err(f) => shared.fail(lua, f),
            }
        })?,
    )?;
    Ok(exports)
}
