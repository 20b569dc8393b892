//! What a Rust helper needs to know about the call it runs in.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use super::helpers::{write_log_line, Level};
use crate::convert::Limits;
use crate::hooks::HookName;

/// Lines a single call may log before further lines are dropped.
pub const LOG_LINES_PER_CALL: u32 = 50;
/// Longest log line a script may write; longer lines are cut.
pub const LOG_LINE_MAX_BYTES: usize = 4096;

/// A VM's [`CallContext`]: in its app data for the helpers, and held by
/// the VM itself, which sets it up twice a call without an app data lookup.
pub(crate) type SharedContext = Rc<RefCell<CallContext>>;

/// The call context of the VM `lua` (`None` in a state without one).
pub(crate) fn context(lua: &mlua::Lua) -> Option<mlua::AppDataRef<'_, SharedContext>> {
    lua.app_data_ref::<SharedContext>()
}

/// Per-call facts, stored in the VM's app data for the duration of a call.
#[derive(Debug)]
pub(crate) struct CallContext {
    pub hook: Option<HookName>,
    pub script: Arc<str>,
    pub request_id: Option<Arc<str>>,
    pub limits: Limits,
    /// Bytes the script may still allocate; bounds `string.rep` and
    /// `json.encode` results before they are built outside the Lua heap.
    pub memory_allowance: usize,
    pub log_lines: u32,
    /// The call's own `math.random` generator, made on first use.
    pub rng: Option<super::random::Rng>,
    /// Whether log lines are held until the call ends (a call under an
    /// inline budget: an overrun call's lines are dropped, see
    /// `crate::inline`).
    pub hold_logs: bool,
    /// Lines held so far.
    pub held: Vec<(Level, String)>,
}

impl CallContext {
    /// Set up this context for a new call, in place: the script name and
    /// request id are shared, not copied, when they did not change. With
    /// `hold_logs`, the call's log lines wait for [`CallContext::release_held`].
    pub fn begin(
        &mut self,
        hook: HookName,
        script: &Arc<str>,
        request_id: Option<&str>,
        limits: Limits,
        memory: usize,
        hold_logs: bool,
    ) {
        self.hook = Some(hook);
        if !Arc::ptr_eq(&self.script, script) {
            self.script = Arc::clone(script);
        }
        if self.request_id.as_deref() != request_id {
            self.request_id = request_id.map(Arc::from);
        }
        self.limits = limits;
        self.memory_allowance = memory;
        self.log_lines = 0;
        self.rng = None;
        self.hold_logs = hold_logs;
        self.held.clear();
    }

    /// Write a script's log line now, or hold it until the call ends.
    pub fn log(&mut self, level: Level, msg: String) {
        if self.hold_logs {
            self.held.push((level, msg));
        } else {
            write_log_line(self, level, &msg);
        }
    }

    /// The call ended: write the held lines when `keep`, else drop them.
    pub fn release_held(&mut self, keep: bool) {
        let held = std::mem::take(&mut self.held);
        if keep {
            for (level, msg) in &held {
                write_log_line(self, *level, msg);
            }
        }
        self.hold_logs = false;
    }

    /// The context of a VM between calls (compile checks, tests).
    pub fn idle() -> Self {
        CallContext {
            hook: None,
            script: Arc::from("-"),
            request_id: None,
            limits: Limits::default(),
            memory_allowance: 10 << 20,
            log_lines: 0,
            rng: None,
            hold_logs: false,
            held: Vec::new(),
        }
    }
}
