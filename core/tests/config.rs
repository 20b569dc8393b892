//! Config loading: the canonical format, the seed's per-section snippets,
//! and one clear error (with its key path) per kind of mistake.

use std::path::Path;

use llmproxy_core::config::OnError;
use llmproxy_core::{Config, Engine, HookName};

fn seed(name: &str) -> String {
    let path = format!("{}/tests/data/seed/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load(yaml: &str) -> Result<Engine, Vec<String>> {
    Config::from_yaml(yaml, Path::new("."))
        .and_then(Engine::new)
        .map_err(|e| e.problems)
}

#[test]
fn seed_section_snippets_load_as_written() {
    // (snippet, hook it enables)
    let cases = [
        ("auth", HookName::Auth),
        ("request_transform", HookName::RequestTransform),
        ("response_transform", HookName::ResponseTransform),
        ("rate_limit", HookName::RateLimit),
        ("usage_hook", HookName::Usage),
        ("error_handler", HookName::ErrorHandler),
    ];
    for (snippet, hook) in cases {
        let engine = load(&seed(snippet)).unwrap_or_else(|e| panic!("{snippet}: {e:?}"));
        for h in HookName::ALL {
            assert_eq!(engine.is_enabled(h), h == hook, "{snippet}: hook {h}");
        }
    }
}

#[test]
fn seed_routing_snippet_sets_both_script_and_script_file() {
    // The seed's routing snippet shows `script_file` as an alternative but
    // leaves it uncommented; two sources for one hook is ambiguous, so it is
    // an error that names the key. Without the alternative it loads.
    let text = seed("routing");
    let problems = load(&text).expect_err("both sources must be rejected");
    assert_eq!(
        problems,
        vec!["routing: set either 'script' or 'script_file', not both"]
    );

    let without_alternative: String = text
        .lines()
        .filter(|l| !l.contains("script_file"))
        .collect::<Vec<_>>()
        .join("\n");
    let engine = load(&without_alternative).expect("routing snippet without script_file");
    assert!(engine.is_enabled(HookName::Routing));
}

#[test]
fn seed_unified_config_loads_when_its_script_files_exist() {
    let text = seed("config");
    let problems = load(&text).expect_err("/etc/llmproxy/scripts does not exist here");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("scripts.routing.script_file: cannot read '/etc/llmproxy/scripts/routing.lua'"));
    assert!(problems[1].starts_with("scripts.auth.script_file: cannot read '/etc/llmproxy/scripts/auth.lua'"));

    let dir = tempdir("seed-config");
    std::fs::write(dir.join("routing.lua"), "return 'standard'").unwrap();
    std::fs::write(dir.join("auth.lua"), "return nil").unwrap();
    let relocated = text.replace("/etc/llmproxy/scripts/", &format!("{}/", dir.display()));
    let engine = load(&relocated).expect("seed config with its scripts present");
    assert_eq!(engine.config().listen.as_deref(), Some(":8000"));
    assert_eq!(engine.config().backends.len(), 2);
    let enabled: Vec<HookName> = HookName::ALL.into_iter().filter(|h| engine.is_enabled(*h)).collect();
    assert_eq!(enabled, vec![HookName::Auth, HookName::Routing]);
}

#[test]
fn script_file_is_relative_to_the_config_file() {
    let dir = tempdir("relative");
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(dir.join("scripts/route.lua"), "return 'a'").unwrap();
    std::fs::write(
        dir.join("llmproxy.yaml"),
        "backends: [{name: a, url: 'http://127.0.0.1:1'}]\nscripts:\n  routing:\n    script_file: scripts/route.lua\n",
    )
    .unwrap();
    let config = Config::from_file(dir.join("llmproxy.yaml")).expect("loads");
    let hook = config.hook(HookName::Routing).expect("routing enabled");
    assert_eq!(&*hook.script.name, "scripts/route.lua");
    assert_eq!(&*hook.script.source, "return 'a'");
}

#[test]
fn limits_and_policies_have_defaults_and_overrides() {
    let engine = load(
        "scripts:\n  defaults: {timeout_ms: 20, memory_mb: 4}\n  auth: {script: 'return nil'}\n  routing: {script: 'return nil', timeout_ms: 5, on_error: deny}\n",
    )
    .expect("loads");
    let auth = engine.config().hook(HookName::Auth).unwrap();
    assert_eq!(
        (auth.limits.timeout_ms, auth.limits.memory_mb, auth.on_error),
        (20, 4, OnError::Deny)
    );
    let routing = engine.config().hook(HookName::Routing).unwrap();
    assert_eq!(
        (routing.limits.timeout_ms, routing.limits.memory_mb, routing.on_error),
        (5, 4, OnError::Deny)
    );

    let engine = load("scripts:\n  usage: {script: 'return nil'}\n").unwrap();
    let usage = engine.config().hook(HookName::Usage).unwrap();
    assert_eq!(
        (usage.limits.timeout_ms, usage.limits.memory_mb, usage.on_error),
        (100, 10, OnError::Standard)
    );
}

#[test]
fn disabled_hooks_are_not_loaded() {
    let engine = load("scripts:\n  routing: {enabled: false, script_file: /does/not/exist.lua}\n").expect("loads");
    assert!(!engine.is_enabled(HookName::Routing));
}

#[test]
fn every_mistake_gets_a_clear_error_with_its_key_path() {
    // (yaml, expected problems, each a prefix)
    let cases: &[(&str, &[&str])] = &[
        ("listen: 1\nbackendz: []\n", &["backendz: unknown field `backendz`"]),
        ("scripts:\n  routing:\n    timeout_ms: fast\n", &["scripts.routing.timeout_ms: invalid type: string \"fast\""]),
        ("scripts:\n  routng: {script: x}\n", &["scripts.routng: unknown field `routng`"]),
        ("scripts:\n  routing: {script: 'return 1', on_error: maybe}\n", &["scripts.routing.on_error: unknown variant `maybe`"]),
        ("backends:\n  - {name: a, url: 'http://x', wieght: 2}\n", &["backends[0].wieght: unknown field `wieght`"]),
        ("scripts:\n  routing: {enabled: true}\n", &["scripts.routing: enabled, but neither 'script' nor 'script_file' is set"]),
        ("scripts:\n  routing: {script: x, script_file: y.lua}\n", &["scripts.routing: set either 'script' or 'script_file', not both"]),
        ("scripts:\n  routing: {script_file: /nonexistent/r.lua}\n", &["scripts.routing.script_file: cannot read '/nonexistent/r.lua'"]),
        (
            "scripts:\n  routing: {script: 'return 1'}\nrouting:\n  script: 'return 2'\n",
            &["routing: the routing hook is already defined at scripts.routing"],
        ),
        (
            "backends:\n  - {name: a, url: 'http://x'}\n  - {name: a, url: 'ftp://y'}\n",
            &["backends[1].name: 'a' is already used by backends[0]", "backends[1].url: 'ftp://y' must start with http:// or https://"],
        ),
        (
            "backends:\n  - {name: a, url: 'http://x', headers: {Host: llm.example, X-Key: k, Connection: close, content-length: '0'}}\n",
            &[
                "backends[0].headers: 'Connection' is written by the host",
                "backends[0].headers: 'content-length' is written by the host",
            ],
        ),
        (
            "scripts:\n  defaults: {timeout_ms: 0}\n  routing: {script: 'return 1', memory_mb: 100000}\n",
            &["scripts.defaults.timeout_ms: 0 is out of range", "scripts.routing.memory_mb: 100000 is out of range"],
        ),
        (
            "scripts:\n  routing:\n    script: |\n      local x =\n  auth:\n    script: |\n      return {allow = true\n",
            &["scripts.auth.script: scripts.auth:2: '}' expected", "scripts.routing.script: scripts.routing:2: unexpected symbol near '<eof>'"],
        ),
        ("scripts:\n  routing: {script: \"\\x1bLua\"}\n", &["scripts.routing.script: "]),
    ];
    for (yaml, expected) in cases {
        let problems = load(yaml).err().unwrap_or_else(|| panic!("should fail:\n{yaml}"));
        assert_eq!(problems.len(), expected.len(), "{yaml}\n{problems:#?}");
        let mut problems = problems.clone();
        problems.sort();
        let mut expected = expected.to_vec();
        expected.sort();
        for (got, want) in problems.iter().zip(expected) {
            assert!(got.starts_with(want), "got:  {got}\nwant: {want}…\n{yaml}");
        }
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmproxy-config-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `llmproxy check` reports every structural problem of a file at once
/// (unknown keys, wrong types, missing fields), each with its key path as
/// written in the file, together with the semantic ones.
#[test]
fn every_structural_problem_is_reported_at_once() {
    // (yaml, expected problems in order, each a prefix)
    let cases: &[(&str, &[&str])] = &[
        (
            "listen: ':8000'\nbackendz: []\nscripts:\n  routng: {script: x}\n  routing:\n    timeout_ms: fast\n    script: 'return nil'\n",
            &[
                "backendz: unknown field `backendz`",
                "scripts.routng: unknown field `routng`",
                "scripts.routing.timeout_ms: invalid type: string \"fast\"",
            ],
        ),
        (
            // Indices stay the file's own after an element is cut out.
            "backends:\n  - {name: a, url: 'http://x', wieght: 2}\n  - {name: b}\n  - {name: c, url: 'http://z', weight: heavy}\n  - {name: d, url: 'http://w', hedaers: {}}\n",
            &[
                "backends[0].wieght: unknown field `wieght`",
                "backends[1]: missing field `url`",
                "backends[2].weight: invalid type: string \"heavy\"",
                "backends[3].hedaers: unknown field `hedaers`",
            ],
        ),
        (
            // Structural and semantic problems together.
            "scripts:\n  routing: {script_file: /nonexistent/r.lua, on_eror: deny}\nlimits: {key_rpm: many}\n",
            &[
                "scripts.routing.on_eror: unknown field `on_eror`",
                "limits.key_rpm: invalid type: string \"many\"",
                "scripts.routing.script_file: cannot read '/nonexistent/r.lua'",
            ],
        ),
        (
            "keys:\n  - {key: sk-1, user_id: u, total_quota: lots}\n  - {key: sk-2, user: u}\n",
            &[
                "keys[0].total_quota: total_quota must be a number of tokens or `unlimited`, not 'lots'",
                "keys[1].user: unknown field `user`",
                "keys[1]: missing field `user_id`",
            ],
        ),
    ];
    for (yaml, expected) in cases {
        let problems = load(yaml).err().unwrap_or_else(|| panic!("should fail:\n{yaml}"));
        assert_eq!(problems.len(), expected.len(), "{yaml}\n{problems:#?}");
        for (got, want) in problems.iter().zip(expected.iter()) {
            assert!(got.starts_with(want), "got:  {got}\nwant: {want}…\n{yaml}");
        }
    }
}

/// The first problem keeps the parser's line and column; the others name
/// their key path only (their text was re-read without the bad nodes).
#[test]
fn the_first_structural_problem_keeps_its_location() {
    let problems =
        load("listen: ':8000'\nbackendz: []\nscripts:\n  routing: {script: 'return nil', timeout_ms: fast}\n")
            .err()
            .unwrap_or_default();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].ends_with("at line 2 column 1"), "{}", problems[0]);
    assert!(!problems[1].contains(" at line "), "{}", problems[1]);
}

/// A problem found after a cut that names no key (a mapping used as a
/// key) still says what it is about (found by the config fuzz target).
#[test]
fn a_later_problem_without_a_key_names_the_document() {
    let problems = load("rgnouit:\n  enabled: true\n? script=: \"return nil\"\n  request_transform: {s%cript: x}\n")
        .err()
        .unwrap_or_default();
    assert!(problems.len() >= 2, "{problems:#?}");
    for p in &problems {
        assert!(
            p.contains(" at line ") || p.starts_with("the config document: ") || p.contains(": "),
            "{p}"
        );
    }
    assert!(
        problems.iter().any(|p| p.starts_with("the config document: ")),
        "{problems:#?}"
    );
}
