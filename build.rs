//! Build steps: bake the project-local libtorch's library folder into the rpath of every
//! binary, test and bench (so they run without LD_LIBRARY_PATH; `LIBTORCH` comes from
//! `.cargo/config.toml`), compile the C++ shim that runs convolutions on oneDNN primitives
//! (src/engine/onednn.cpp, against Debian's oneDNN and the same libtorch headers tch's own
//! C++ uses) and link oneDNN, and generate the gRPC code from `proto/` with a vendored protoc.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from).ok_or(
        "LIBTORCH is not set (.cargo/config.toml points it at .libtorch/current; run deploy/setup.sh)",
    )?;
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", libtorch.join("lib").display());

    println!("cargo:rerun-if-changed=src/engine/onednn.cpp");
    // oneDNN from Debian's libdnnl-dev (deploy/setup.sh installs it): the library the shim's
    // primitives come from, apart from the copy libtorch keeps private inside itself.
    // `SLUICE_DNNL_PREFIX` builds against another oneDNN (its `include/` and `lib/`, the
    // library found there at run time too): benches/onednn3_probe.sh times oneDNN 3.x so.
    println!("cargo:rerun-if-env-changed=SLUICE_DNNL_PREFIX");
    let prefix = std::env::var_os("SLUICE_DNNL_PREFIX").map(PathBuf::from).unwrap_or_else(|| "/usr".into());
    let oneapi = prefix.join("include/oneapi");
    let dnnl_header = oneapi.join("dnnl/dnnl.hpp");
    if !dnnl_header.exists() {
        return Err(format!(
            "{} is missing: sluice's convolutions need Debian's libdnnl-dev (run deploy/setup.sh) \
             or SLUICE_DNNL_PREFIX pointing at another oneDNN",
            dnnl_header.display()
        )
        .into());
    }
    // libtorch's include folder carries its own (newer) oneDNN headers, whose library it keeps
    // private; a folder holding only Debian's `oneapi/` goes first so the shim compiles
    // against the library it links. (GCC ignores `-I/usr/include`, a system folder.)
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let dnnl_include = out.join("dnnl-include");
    std::fs::create_dir_all(&dnnl_include)?;
    let link = dnnl_include.join("oneapi");
    if std::fs::read_link(&link).ok().as_deref() != Some(oneapi.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&oneapi, &link)?;
    }
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(&dnnl_include)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The PyPI wheel's libtorch is built with the C++11 string ABI (as tch's build assumes).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag_if_supported("-Wno-unused-parameter")
        .file("src/engine/onednn.cpp")
        .compile("sluice_onednn");
    if prefix != std::path::Path::new("/usr") {
        println!("cargo:rustc-link-search=native={}", prefix.join("lib").display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", prefix.join("lib").display());
    }
    println!("cargo:rustc-link-lib=dylib=dnnl");

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
