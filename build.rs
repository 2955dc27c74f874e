//! Build steps: bake the project-local libtorch's library folder into the rpath of every
//! binary, test and bench (so they run without LD_LIBRARY_PATH; `LIBTORCH` comes from
//! `.cargo/config.toml`), and generate the gRPC code from `proto/` with a vendored protoc.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", libtorch.join("lib").display());
    }

    println!("cargo:rerun-if-changed=proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; protoc's path is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // Malformed requests are the client's fault: INVALID_ARGUMENT rather than INTERNAL.
        .codec_path("crate::protocol::grpc::codec::ClientErrorCodec")
        .compile_protos(&["proto/grpc_service.proto", "proto/sluice_admin.proto"], &["proto"])?;
    Ok(())
}
