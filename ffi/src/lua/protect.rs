//! One protected call on the host's stack for the module's table walkers,
//! without allocating.
//!
//! The walkers (`request_table`, `hop_headers`) read a host table with the
//! raw C API, which may raise a Lua error (an allocation that fails), so
//! they run protected. mlua's `Lua::exec_raw` protects with a `lua_cpcall`
//! that allocates two C closures, then a `lua_pcall` of them: two
//! protected calls and two garbage objects per walk, on every request
//! under nginx. `lua_cpcall` alone needs no function object: LuaJIT calls
//! the C function through a C frame, with the job as a light userdata.

use std::ffi::{c_int, c_void};

use mlua::ffi::{self, lua_State};
use mlua::{IntoLua, Lua, Table};

/// What [`with_tables`] runs, and what came of it.
struct Job<'a, F, R> {
    tables: &'a [&'a Table],
    /// Pushes `tables` (mlua keeps them in its own reference thread).
    push: &'a dyn Fn(&Table) -> mlua::Result<()>,
    work: Option<F>,
    /// What the work returned; `None` when it could not run.
    out: Option<R>,
}

/// Run `work` in one `lua_cpcall` with `tables` pushed at stack indices
/// `1..=tables.len()` of its frame; its result, or the error the walk
/// raised (the stack is restored either way).
///
/// A Lua error raised inside `work` (an allocation that fails) unwinds
/// through its frames, dropping what they own, to the `lua_cpcall`, as
/// under mlua's `exec_raw`; it is not caught on the way (`catch_unwind`
/// would abort the process on LuaJIT's foreign exception).
///
/// # Safety
/// `work` gets the raw state: it must keep the stack balanced, read
/// borrowed bytes only while their value is on the stack, and not panic
/// (as `exec_raw` requires of its closure).
pub(super) unsafe fn with_tables<F, R>(lua: &Lua, tables: &[&Table], work: F) -> mlua::Result<R>
where
    F: FnOnce(*mut lua_State) -> R,
{
    lua.exec_raw_lua(|raw| {
        let state = raw.state();
        let push = |t: &Table| t.push_into_stack(raw);
        let mut job = Job {
            tables,
            push: &push,
            work: Some(work),
            out: None,
        };
        // SAFETY: `state` is the live state mlua runs this callback on;
        // `run::<F, R>` reads `job` only during this call, through the
        // pointer it is given.
        unsafe {
            let top = ffi::lua_gettop(state);
            let code = ffi::lua_cpcall(state, run::<F, R>, &mut job as *mut Job<'_, F, R> as *mut c_void);
            let result = if code == ffi::LUA_OK {
                job.out.ok_or(mlua::Error::StackError)
            } else {
                let message = String::from_utf8_lossy(llmproxy_core::stack::str_at(state, -1)).into_owned();
                Err(if code == ffi::LUA_ERRMEM {
                    mlua::Error::MemoryError(message)
                } else {
                    mlua::Error::RuntimeError(message)
                })
            };
            ffi::lua_settop(state, top);
            result
        }
    })
}

/// The C function `lua_cpcall` runs: the job's tables pushed, its work run.
unsafe extern "C-unwind" fn run<F, R>(state: *mut lua_State) -> c_int
where
    F: FnOnce(*mut lua_State) -> R,
{
    // SAFETY: `with_tables` passes its `Job` as the only value of this
    // frame and outlives the call.
    unsafe {
        let job = &mut *(ffi::lua_touserdata(state, 1) as *mut Job<'_, F, R>);
        ffi::lua_settop(state, 0);
        let n = c_int::try_from(job.tables.len()).unwrap_or(c_int::MAX);
        if ffi::lua_checkstack(state, n) == 0 || job.tables.iter().any(|t| (job.push)(t).is_err()) {
            return 0;
        }
        if let Some(work) = job.work.take() {
            job.out = Some(work(state));
        }
        0
    }
}
