//! Compiles the server-side protos under `specs/proto` (admin, node, health, and the Envoy SDS subset) with the
//! vendored `protoc` (no protoc is needed on the machine; `PROTOC` overrides it). The
//! protos a workload needs are generated into `writ-spiffe` and committed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => std::path::PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos = [
        "../specs/proto/writ/admin/v1/admin.proto",
        "../specs/proto/writ/node/v1/node.proto",
        "../specs/proto/grpc/health/v1/health.proto",
        "../specs/proto/envoy/service/secret/v3/sds.proto",
        "../specs/proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
        "../specs/proto/envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=../specs/proto/envoy");
    println!("cargo:rerun-if-changed=../specs/proto/google");
    tonic_prost_build::configure().compile_with_config(config, &protos, &["../specs/proto"])?;
    Ok(())
}
