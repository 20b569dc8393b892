//! Scripts' `log.*` and `print` lines for the LuaJIT host.
//!
//! The core emits them as `tracing` events (target `llmproxy::script`,
//! fields `request_id`, `hook`, `script`), which the gateway and
//! `llmproxy hook` write as JSON lines. A host embedding this module has
//! its own log (nginx's error log), so the module installs a subscriber
//! that keeps the events of the calling thread while an `engine:run*` call
//! runs there ([`capture`]) and hands them back with the call's result; the
//! host writes them. Nothing is written from Rust, and no other thread is
//! involved (hooks run on the calling thread).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::Once;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// The target of the core's script log events.
const TARGET: &str = "llmproxy::script";

/// At most this many lines are kept per call (the core's own limit per
/// call is lower; this bounds a call that runs several scripts).
const MAX_LINES: usize = 256;

/// One script log line.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Line {
    /// `"info"`, `"warn"` or `"error"`.
    pub level: &'static str,
    /// The text the script logged.
    pub message: String,
    /// The request id (`-` when the call had none).
    pub request_id: String,
    /// The hook.
    pub hook: String,
    /// The script's name.
    pub script: String,
}

thread_local! {
    /// The lines of the call running on this thread; `None` when no call
    /// captures.
    static LINES: RefCell<Option<Vec<Line>>> = const { RefCell::new(None) };
}

/// Run `f` keeping the script log lines it emits on this thread.
pub(crate) fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<Line>) {
    let outer = LINES.with(|l| l.borrow_mut().replace(Vec::new()));
    let out = f();
    let lines = LINES.with(|l| {
        let mut slot = l.borrow_mut();
        let mine = slot.take().unwrap_or_default();
        *slot = outer;
        mine
    });
    (out, lines)
}

/// Install the subscriber (once per process). When the process already
/// has a global subscriber (a Rust host), it keeps it and nothing is
/// captured.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(ScriptLog);
    });
}

/// The subscriber: script events only, into the calling thread's buffer.
struct ScriptLog;

impl Subscriber for ScriptLog {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_event() && meta.target() == TARGET {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target() == TARGET
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        LINES.with(|l| {
            let mut slot = l.borrow_mut();
            let Some(lines) = slot.as_mut() else {
                return;
            };
            if lines.len() >= MAX_LINES {
                return;
            }
            let level = match *event.metadata().level() {
                Level::ERROR => "error",
                Level::WARN => "warn",
                _ => "info",
            };
            let mut line = Line {
                level,
                ..Line::default()
            };
            event.record(&mut Fields(&mut line));
            lines.push(line);
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Copies an event's fields into a [`Line`].
struct Fields<'a>(&'a mut Line);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.slot(field).push_str(value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.slot(field), "{value:?}");
    }
}

impl Fields<'_> {
    fn slot(&mut self, field: &Field) -> &mut String {
        match field.name() {
            "request_id" => &mut self.0.request_id,
            "hook" => &mut self.0.hook,
            "script" => &mut self.0.script,
            _ => &mut self.0.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_the_call_are_captured_with_their_tags() {
        install();
        let ((), lines) = capture(|| {
            tracing::warn!(target: "llmproxy::script", request_id = %"r-1", hook = "routing", script = %"route.lua", "hello {}", 42);
            tracing::warn!(target: "llmproxy::other", "not a script line");
        });
        assert_eq!(
            lines,
            vec![Line {
                level: "warn",
                message: String::from("hello 42"),
                request_id: String::from("r-1"),
                hook: String::from("routing"),
                script: String::from("route.lua"),
            }]
        );
        tracing::info!(target: "llmproxy::script", "outside any call: dropped");
        let ((), none) = capture(|| ());
        assert!(none.is_empty());
    }
}
