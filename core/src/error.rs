//! Error types: one for running a hook, one for loading a configuration.

use std::fmt;

use crate::hooks::HookName;

/// Cut `text` to at most `max` bytes on a character boundary, appending
/// `marker` when something was cut. Used for script-controlled text that
/// reaches logs (error messages, log lines).
/// A URL as it may be shown in messages and logs: the password of its
/// `user:password@` masked (`postgres://u:***@db/x`).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

pub(crate) fn truncate_utf8(text: &mut String, max: usize, marker: &str) {
    if text.len() <= max {
        return;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(marker);
}

/// What went wrong when a hook ran. Hosts map these to metrics labels and to
/// the failure policy (`on_error`) of the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The script ran past its time limit (wall clock).
    Timeout,
    /// The script allocated past its memory limit.
    Memory,
    /// The script raised an error (including sandbox violations).
    ScriptError,
    /// The script returned a value that does not fit the hook's contract.
    BadOutput,
    /// The input handed to the hook was malformed, too large or too deep.
    BadInput,
    /// No VM could be had (pool closed or exhausted past its wait time), or
    /// the engine itself failed. Never caused by a script.
    Internal,
}

impl ErrorKind {
    /// The stable name used in logs, metrics, JSON and the C ABI.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Memory => "memory",
            ErrorKind::ScriptError => "script_error",
            ErrorKind::BadOutput => "bad_output",
            ErrorKind::BadInput => "bad_input",
            ErrorKind::Internal => "internal",
        }
    }

    /// Every kind, for metrics that pre-register their label values.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Timeout,
        ErrorKind::Memory,
        ErrorKind::ScriptError,
        ErrorKind::BadOutput,
        ErrorKind::BadInput,
        ErrorKind::Internal,
    ];
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed hook call: what kind of failure, a message for the operator, and
/// where it happened (hook, script name, line when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// The classification of the failure.
    pub kind: ErrorKind,
    /// A human-readable message; never contains the request body.
    pub message: String,
    /// The hook that ran, when known.
    pub hook: Option<HookName>,
    /// The script's name (`scripts.routing` or the `script_file` path).
    pub script: Option<String>,
    /// The line in the script, when the error carries one.
    pub line: Option<u32>,
}

impl HookError {
    /// A new error with no location yet.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        HookError {
            kind,
            message: message.into(),
            hook: None,
            script: None,
            line: None,
        }
    }

    /// Shorthand for a [`ErrorKind::BadOutput`] error.
    pub fn bad_output(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadOutput, message)
    }

    /// Shorthand for a [`ErrorKind::BadInput`] error.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadInput, message)
    }

    /// Attach the hook and script this error came from, unless already set.
    pub fn at(mut self, hook: HookName, script: &str) -> Self {
        self.hook.get_or_insert(hook);
        if self.script.is_none() {
            self.script = Some(script.to_owned());
        }
        self
    }

    /// `script:line` when both are known, else whatever is known.
    pub fn location(&self) -> String {
        match (&self.script, self.line) {
            (Some(s), Some(l)) => format!("{s}:{l}"),
            (Some(s), None) => s.clone(),
            (None, _) => String::from("-"),
        }
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hook {
            Some(h) => write!(f, "{} in {} hook ({}): {}", self.kind, h, self.location(), self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

impl std::error::Error for HookError {}

/// Everything wrong with a configuration. Loading collects every problem it
/// can find before giving up, so `llmproxy check` reports them all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// One entry per problem: `key.path: message` (and `file:line` for Lua).
    pub problems: Vec<String>,
}

impl ConfigError {
    /// A config error with a single problem.
    pub fn one(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => f.write_str(one),
            many => {
                write!(f, "{} problems:", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_url_is_shown_without_its_password() {
        for (url, shown) in [
            ("redis://u:pw@h:1/2", "redis://u:***@h:1/2"),
            ("redis://:pw@h", "redis://:***@h"),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("redis://u@h", "redis://u@h"),
            ("redis://h", "redis://h"),
            ("/var/lib/usage.db", "/var/lib/usage.db"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
