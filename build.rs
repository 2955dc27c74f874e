//! Build steps: bake the project-local libtorch's library folder into the rpath of every
//! binary, test and bench (so they run without LD_LIBRARY_PATH; `LIBTORCH` comes from
//! `.cargo/config.toml`), compile the C++ shim that reaches libtorch's fused oneDNN
//! convolutions (src/engine/onednn.cpp, against the same libtorch headers tch's own C++
//! uses), and generate the gRPC code from `proto/` with a vendored protoc.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from).ok_or(
        "LIBTORCH is not set (.cargo/config.toml points it at .libtorch/current; run deploy/setup.sh)",
    )?;
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", libtorch.join("lib").display());

    println!("cargo:rerun-if-changed=src/engine/onednn.cpp");
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The PyPI wheel's libtorch is built with the C++11 string ABI (as tch's build assumes).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag_if_supported("-Wno-unused-parameter")
        .file("src/engine/onednn.cpp")
        .compile("sluice_onednn");

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
