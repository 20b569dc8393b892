//! `llmproxy`: the LLMProxy command line (see [`llmproxy_server::cli`]).

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the Lua VMs allocate on every hook
/// call from several threads, and glibc's malloc/free were a quarter of the
/// gateway's CPU with four hooks on (docs/adr/014-allocator.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    llmproxy_server::cli::main()
}
