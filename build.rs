//! Compiles `proto/xgate/v1/*.proto` with `protox` (pure Rust: no system `protoc`) and
//! generates the tonic client and server code. The encoded descriptor set is written to
//! `$OUT_DIR/xgate_descriptor.bin` for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/xgate/v1/types.proto",
        "proto/xgate/v1/exchange.proto",
        "proto/xgate/v1/catalog.proto",
        "proto/xgate/v1/usage.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("xgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // The gateway's own view of `DataExchange` (src/wire.rs): the same service, but its
    // `QueryResponse` is `crate::wire::QueryResponse`, whose rows stay encoded, so responses
    // pass through without decoding and re-encoding every cell. Every other type is `pb`'s.
    let wire_out = out.join("wire");
    fs::create_dir_all(&wire_out)?;
    let mut cfg = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&wire_out)
        .extern_path(".xgate.v1.QueryResponse", "crate::wire::QueryResponse");
    for t in [
        "Value",
        "FieldType",
        "Sensitivity",
        "ShareType",
        "Column",
        "Row",
        "ValueList",
        "Condition",
        "Filter",
        "QueryRequest",
    ] {
        cfg = cfg.extern_path(format!(".xgate.v1.{t}"), format!("crate::pb::{t}"));
    }
    cfg.compile_fds(protox::compile(
        [
            "proto/xgate/v1/types.proto",
            "proto/xgate/v1/exchange.proto",
        ],
        ["proto"],
    )?)?;
    Ok(())
}
