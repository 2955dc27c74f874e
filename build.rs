//! Bakes the project-local libtorch's library folder into the rpath of every binary, test
//! and bench, so they run without LD_LIBRARY_PATH. `LIBTORCH` comes from
//! `.cargo/config.toml`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", libtorch.join("lib").display());
    }
}
