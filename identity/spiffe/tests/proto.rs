//! The committed generated code under `src/proto/` is what the protos in `specs/proto`
//! produce: this test regenerates it with the vendored protoc and fails on any
//! difference. Run it with `WRIT_BLESS_PROTOS=1` to rewrite the files after a proto change.
#![expect(
    unused_crate_dependencies,
    reason = "an integration-test target sees every dependency and dev-dependency of its package"
)]

use std::path::{Path, PathBuf};

/// (proto file under specs/proto, the file tonic writes, the committed file).
const GENERATED: [(&str, &str, &str); 2] = [
    ("workload.proto", "_.rs", "workload.rs"),
    (
        "writ/delegation/v1/subagents.proto",
        "writ.delegation.v1.rs",
        "delegation.rs",
    ),
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failed generation fails the test"
)]
fn generate(out: &Path) {
    let specs = crate_dir().join("../../specs/proto");
    let protos: Vec<PathBuf> = GENERATED.iter().map(|(p, _, _)| specs.join(p)).collect();
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path().unwrap());
    tonic_prost_build::configure()
        .build_transport(false)
        .out_dir(out)
        .compile_with_config(config, &protos, &[specs])
        .unwrap();
}

#[test]
fn committed_proto_code_matches_the_protos() {
    let out = tempfile::tempdir().unwrap();
    generate(out.path());
    let bless = std::env::var_os("WRIT_BLESS_PROTOS").is_some();
    let mut drift = Vec::new();
    for (proto, produced, committed) in GENERATED {
        let fresh = std::fs::read_to_string(out.path().join(produced)).unwrap();
        let path = crate_dir().join("src/proto").join(committed);
        if bless {
            std::fs::write(&path, &fresh).unwrap();
            continue;
        }
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != fresh {
            drift.push(format!("{} (from {proto})", path.display()));
        }
    }
    assert!(
        drift.is_empty(),
        "generated code is stale: {drift:?}; rerun with WRIT_BLESS_PROTOS=1 and commit"
    );
}
