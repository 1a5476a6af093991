//! The wire contract's JSON examples in `tests/contract/`, shared with the Python client
//! (`clients/python/tests/test_contract.py`): each parses into its type and serializes back to
//! the same JSON, so neither side can drift from the other without a test failing.

#![allow(clippy::unwrap_used, missing_docs)]

use serde_json::Value;
use shared::schema::{Job, JobResult};

fn example(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/contract")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str) {
    let file = example(name);
    let parsed: T = serde_json::from_value(file.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let written = serde_json::to_value(&parsed).unwrap();
    assert_eq!(
        written, file,
        "{name} does not survive a round trip through its Rust type"
    );
}

#[test]
fn jobs_round_trip() {
    round_trip::<Job>("job_v1.json");
    round_trip::<Job>("job_v2_delayed.json");
}

#[test]
fn results_round_trip() {
    round_trip::<JobResult>("result_ok.json");
    round_trip::<JobResult>("result_failed.json");
    round_trip::<JobResult>("result_hops.json");
}

#[test]
fn every_example_is_tested() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "job_v1.json",
            "job_v2_delayed.json",
            "result_failed.json",
            "result_hops.json",
            "result_ok.json"
        ]
    );
}
