//! Bakes the project-local libtorch's library folder into the fuzz binaries' rpath, as the
//! main crate's build script does for its own binaries (`LIBTORCH` comes from
//! ../.cargo/config.toml), so they run without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
