//! Runs every shared case in `conformance/cases/` in-process.

use llmproxy_core::conformance;

#[test]
fn every_conformance_case_passes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/cases");
    let cases = conformance::load_dir(dir).expect("conformance cases load");
    assert!(
        cases.len() >= 20,
        "expected the seed cases at least, found {}",
        cases.len()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| c.run().err().map(|e| format!("{} ({}): {e}", c.name, c.file.display())))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{} conformance cases passed", cases.len());
}
