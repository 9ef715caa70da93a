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
    Ok(())
}
