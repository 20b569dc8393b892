//! The offline subcommands: `llmproxy check` and `llmproxy hook`, run as a
//! real process, with their output and exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llmproxy"))
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn tmp(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Run `llmproxy hook`, return (exit code, parsed stdout).
fn hook(args: &[&str], stdin: Option<&str>) -> (i32, Value) {
    let mut child = bin()
        .arg("hook")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llmproxy");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value)
}

#[test]
fn check_accepts_the_example_config() {
    let out = bin().arg("check").arg(repo("examples/llmproxy.yaml")).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok (3 backends; hooks: auth, rate_limit, routing"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_problem_and_exits_2() {
    let config = tmp(
        "broken.yaml",
        "scripts:\n  routing:\n    script: 'return ('\n  auth:\n    script_file: missing.lua\n  usage:\n    script: x\n    script_file: y.lua\n",
    );
    let out = bin().arg("check").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert!(
        stderr.contains("scripts.routing.script: scripts.routing:1: unexpected symbol near '<eof>'"),
        "{stderr}"
    );
    assert!(stderr.contains("scripts.auth.script_file: cannot read"), "{stderr}");
    assert!(
        stderr.contains("scripts.usage: set either 'script' or 'script_file', not both"),
        "{stderr}"
    );

    // Once the file problems are fixed, the Lua syntax error is reported with file:line.
    let config = tmp(
        "syntax.yaml",
        "scripts:\n  routing:\n    script: |\n      local a = 1\n      return (\n",
    );
    let out = bin().arg("check").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("scripts.routing.script: scripts.routing:3:"),
        "{stderr}"
    );
}

#[test]
fn hook_runs_scripts_and_classifies_failures() {
    let input = repo("conformance/cases/001-seed-routing-viplevel-3.json");
    let case: Value = serde_json::from_str(&std::fs::read_to_string(input).unwrap()).unwrap();
    let input = tmp("input.json", &case["input"].to_string());
    let input = input.to_str().unwrap();
    let routing = repo("examples/scripts/routing.lua");
    let routing = routing.to_str().unwrap();

    // (script or path, extra args, exit code, ok, result or error kind)
    let loop_script = tmp("loop.lua", "while true do end");
    let mem_script = tmp("mem.lua", "local s = 'x' while true do s = s .. s end");
    let bad = tmp("bad.lua", "return 42");
    let err = tmp("err.lua", "local x = nil\nreturn x.field");
    let cases: Vec<(&str, Vec<&str>, i32, Value)> = vec![
        (
            routing,
            vec!["--input", input],
            0,
            json!({"ok": true, "result": "ultra"}),
        ),
        (
            loop_script.to_str().unwrap(),
            vec!["--timeout-ms", "30"],
            1,
            json!({"ok": false, "kind": "timeout"}),
        ),
        (
            mem_script.to_str().unwrap(),
            vec!["--memory-mb", "2"],
            1,
            json!({"ok": false, "kind": "memory"}),
        ),
        (
            bad.to_str().unwrap(),
            vec![],
            1,
            json!({"ok": false, "kind": "bad_output"}),
        ),
        (
            err.to_str().unwrap(),
            vec![],
            1,
            json!({"ok": false, "kind": "script_error", "line": 2}),
        ),
    ];
    for (script, extra, code, want) in cases {
        let mut args = vec!["routing", "--script", script];
        args.extend(extra.iter());
        let (got_code, out) = hook(&args, None);
        assert_eq!(got_code, code, "{script}: {out}");
        assert_eq!(out["ok"], want["ok"], "{script}: {out}");
        if let Some(result) = want.get("result") {
            assert_eq!(&out["result"], result, "{script}: {out}");
            assert!(out["elapsed_us"].is_u64(), "{out}");
        } else {
            assert_eq!(out["error"]["kind"], want["kind"], "{script}: {out}");
            assert!(out["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{out}");
        }
        if let Some(line) = want.get("line") {
            assert_eq!(&out["error"]["line"], line, "{out}");
        }
    }
}

#[test]
fn hook_reads_stdin_and_rejects_bad_usage_with_exit_2() {
    let routing = repo("examples/scripts/routing.lua");
    let routing = routing.to_str().unwrap();
    let (code, out) = hook(
        &["routing", "--script", routing, "--input", "-"],
        Some(r#"{"request":{"id":"r","body":{"viplevel":1}},"backends":{"high-performance":{}}}"#),
    );
    assert_eq!((code, &out["result"]), (0, &json!("high-performance")), "{out}");

    for (args, stdin) in [
        (vec!["nohook", "--script", routing], None),
        (vec!["routing", "--script", "/does/not/exist.lua"], None),
        (vec!["routing", "--script", routing, "--input", "-"], Some("{not json")),
        (vec!["routing", "--script", routing, "--input", "-"], Some("[1, 2]")),
        (vec!["routing", "--script", routing, "--timeout-ms", "0"], None),
    ] {
        let (code, _) = hook(&args, stdin);
        assert_eq!(code, 2, "{args:?} {stdin:?}");
    }
}

#[test]
fn check_accepts_the_accounts_example() {
    let out = bin()
        .arg("check")
        .arg(repo("examples/configs/accounts.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hooks: auth, rate_limit, usage"));
}

#[test]
fn keys_and_usage_commands_explain_their_mistakes() {
    let config = tmp("inline-keys.yaml", "keys: [{key: sk-1, user_id: u}]\n");
    let out = bin()
        .args(["keys", "disable", "sk-1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no keys_file"));
    let out = bin().args(["usage", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no ledger"));
    let out = bin().args(["usage", "--db", "/nonexistent/x.db"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The mode bits of a file.
#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Run `llmproxy keys ARGS --config CONFIG`, asserting success.
fn keys_ok(args: &[&str], config: &std::path::Path) -> String {
    let out = bin()
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "keys {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[cfg(unix)]
#[test]
fn keys_edits_keep_the_keys_file_private() {
    use std::os::unix::fs::PermissionsExt;
    // (keys file mode before, or None: no file yet; mode expected after)
    for (case, before, want) in [
        ("private", Some(0o600), 0o600),
        ("group", Some(0o640), 0o640),
        ("new", None, 0o600),
    ] {
        let config = tmp(
            &format!("keys-mode-{case}.yaml"),
            &format!("keys_file: keys-{case}.yaml\n"),
        );
        let keys = config.with_file_name(format!("keys-{case}.yaml"));
        let _ = std::fs::remove_file(&keys);
        if let Some(m) = before {
            std::fs::write(&keys, "- {key: sk-old-0123456789, user_id: u0}\n").unwrap();
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let key = keys_ok(&["add", "--user", "u1"], &config);
        assert!(key.starts_with("sk-"), "{case}: {key}");
        assert_eq!(mode(&keys), want, "{case}: after keys add");
        keys_ok(&["disable", &key], &config);
        assert_eq!(mode(&keys), want, "{case}: after keys disable");
        keys_ok(&["set-quota", &key, "--total", "10"], &config);
        assert_eq!(mode(&keys), want, "{case}: after keys set-quota");
        let text = std::fs::read_to_string(&keys).unwrap();
        assert!(text.contains("disabled"), "{case}: {text}");
        let dir = keys.parent().unwrap();
        let stray: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // This case's temporary files only: other tests write in the
            // same directory concurrently.
            .filter(|n| n.contains(&format!("keys-{case}.yaml")) && n.ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{case}: temporary files left: {stray:?}");
    }
}

#[cfg(unix)]
#[test]
fn the_ledger_database_is_created_private() {
    let config = tmp(
        "ledger-mode.yaml",
        "keys_file: ledger-mode-keys.yaml\nledger: {path: ledger-mode/usage.db}\n",
    );
    let dir = config.with_file_name("ledger-mode");
    let _ = std::fs::remove_dir_all(&dir);
    let key = keys_ok(&["add", "--user", "u1"], &config);
    // `--used` resets the count in the ledger, which creates it.
    keys_ok(&["set-quota", &key, "--used", "5"], &config);
    let db = dir.join("usage.db");
    assert_eq!(mode(&db), 0o600);
    for side in ["usage.db-wal", "usage.db-shm"] {
        let p = dir.join(side);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{side}");
        }
    }
}

#[test]
fn keys_add_stores_a_hash_unless_told_otherwise() {
    let config = tmp(
        "keys-hash.yaml",
        "keys_file: keys-hash-keys.yaml
",
    );
    let keys = config.with_file_name("keys-hash-keys.yaml");
    let _ = std::fs::remove_file(&keys);
    let hashed = keys_ok(&["add", "--user", "u1"], &config);
    let clear = keys_ok(&["add", "--user", "u2", "--plaintext"], &config);
    let text = std::fs::read_to_string(&keys).unwrap();
    assert!(!text.contains(&hashed), "{text}");
    assert!(
        text.contains(&format!("key_sha256: {}", llmproxy_core::keys::key_sha256_hex(&hashed))),
        "{text}"
    );
    assert!(text.contains(&format!("key: {clear}")), "{text}");
    // Both forms are found by the key and by the fingerprint; adding the
    // same key again is refused whatever the form.
    keys_ok(&["disable", &hashed], &config);
    keys_ok(&["enable", &llmproxy_core::keys::key_fingerprint(&hashed)], &config);
    let out = bin()
        .args([
            "keys",
            "add",
            "--user",
            "u3",
            "--plaintext",
            "--key",
            &hashed,
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already defined"));
    let list: Value = serde_json::from_str(&keys_ok(&["list", "--format", "json"], &config)).unwrap();
    assert_eq!(list[0]["key"], "(hashed)");
    assert_eq!(list[0]["fingerprint"], llmproxy_core::keys::key_fingerprint(&hashed));
    assert!(!list.to_string().contains(&hashed));
    // The config loads with both (the gateway reads it the same way).
    let out = bin().arg("check").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
