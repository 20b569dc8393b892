//! `llmproxy`: the LLMProxy command line.
//!
//! - `llmproxy check CONFIG`: load and compile a config, report every error.
//! - `llmproxy hook HOOK --script FILE`: run one hook once on a JSON input.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
