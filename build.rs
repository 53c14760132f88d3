//! Gives distill's own binaries, tests, examples and benches an rpath to libtorch, so that nothing has to set
//! LD_LIBRARY_PATH. torch-sys exports the directory it linked against as DEP_TCH_LIBTORCH_LIB (its package has
//! `links = "tch"`); only crates depending on torch-sys directly can read it, hence our direct dependency.
//! Link arguments from a build script do not propagate to downstream crates: they need the same few lines.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else { return };
    let lib = Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // rustc links with --as-needed, so a binary that uses no CUDA symbol never loads libtorch_cuda and CUDA stays
    // unavailable at run time. Keep libtorch (and thus libtorch_cuda) only when the full CUDA set of the PyPI
    // wheel is installed beside it (scripts/setup.sh --cuda); on a CPU-only set-up libtorch_cuda cannot load.
    let cuda_libs = lib.join("../../nvidia/cublas/lib");
    if lib.join("libtorch_cuda.so").exists() && cuda_libs.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
