use llmproxy_core::{Config, Engine, HookName};
use std::path::Path;
use std::time::Instant;

#[test]
#[ignore]
fn probe() {
    let src = std::fs::read_to_string(std::env::var("PROBE").unwrap()).unwrap();
    for script in src.split("\n----\n") {
        let yaml = format!(
            "scripts:\n  pool: {{size: 1}}\n  defaults: {{timeout_ms: 50, memory_mb: 8}}\n  usage:\n    script: |\n{}\n",
            script.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
        );
        let engine = Engine::new(Config::from_yaml(&yaml, Path::new(".")).unwrap()).unwrap();
        let t = Instant::now();
        let r = engine.run_json(HookName::Usage, &serde_json::json!({}));
        let r = match r {
            Ok(v) => format!("OK {v}"),
            Err(e) => format!("ERR {} {}", e.kind, e.message),
        };
        println!(
            "{:>6.1}ms {:?} => {}",
            t.elapsed().as_secs_f64() * 1000.0,
            script.chars().take(90).collect::<String>(),
            r.chars().take(300).collect::<String>()
        );
    }
}
