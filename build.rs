//! With the `torch` feature: compiles the CUDA-graph shim (src/backend/torch/graph_shim.cpp)
//! against the headers of the torch that tch links (LIBTORCH_USE_PYTORCH: the pip torch found by
//! `python3`, or $LIBTORCH). Without CUDA headers, or if that compile fails, the shim is built as
//! stubs and the backend decodes eagerly; the build itself never fails on it.

use std::env;

const SHIM: &str = "src/backend/torch/graph_shim.cpp";

fn main() {
    println!("cargo:rerun-if-changed={SHIM}");
    for var in ["LIBTORCH", "LIBTORCH_USE_PYTORCH", "CUDA_HOME", "KVGEN_NO_CUDA_GRAPHS", "VIRTUAL_ENV"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    #[cfg(feature = "torch")]
    shim::build();
}

#[cfg(feature = "torch")]
mod shim {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// (torch package dir with include/ and lib/, its C++ ABI flag, the Python site dir).
    fn torch_location() -> Option<(PathBuf, String, Option<PathBuf>)> {
        if let Some(dir) = env::var_os("LIBTORCH") {
            return Some((PathBuf::from(dir), "1".into(), None));
        }
        // tch's build script runs `python` inside a virtualenv and `python3` otherwise; do the same.
        let python = if env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let script = "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))";
        let out = Command::new(python).args(["-c", script]).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let mut lines = text.lines();
        let dir = PathBuf::from(lines.next()?.trim());
        let abi = lines.next().unwrap_or("1").trim().to_string();
        let site = dir.parent().map(Path::to_path_buf);
        Some((dir, abi, site))
    }

    /// The CUDA runtime headers: $CUDA_HOME, the system toolkit, or the nvidia-* pip wheels that
    /// torch depends on (cu13: nvidia/cu13/include; cu12: nvidia/cuda_runtime/include). The cu13
    /// wheel lacks the compiler headers under crt/ that cuda_runtime.h includes; triton's wheel
    /// (a torch dependency) ships them, so its include dir is appended for those.
    fn cuda_includes(site: Option<&Path>) -> Option<Vec<PathBuf>> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(home) = env::var_os("CUDA_HOME") {
            candidates.push(PathBuf::from(home).join("include"));
        }
        candidates.push(PathBuf::from("/usr/local/cuda/include"));
        if let Some(site) = site {
            candidates.push(site.join("nvidia/cu13/include"));
            candidates.push(site.join("nvidia/cuda_runtime/include"));
            candidates.push(site.join("triton/backends/nvidia/include"));
        }
        let runtime = candidates.iter().find(|d| d.join("cuda_runtime_api.h").is_file())?.clone();
        let mut dirs = vec![runtime.clone()];
        if !runtime.join("crt/host_config.h").is_file() {
            dirs.push(candidates.into_iter().find(|d| d.join("crt/host_config.h").is_file())?);
        }
        Some(dirs)
    }

    pub fn build() {
        let Some((torch, abi, site)) = torch_location() else {
            println!("cargo:warning=kvgen: torch not found for the CUDA-graph shim; building it as stubs");
            return stub(None, "1");
        };
        let lib = torch.join("lib");
        let cuda = cuda_includes(site.as_deref());
        let has_cuda_torch = lib.join("libtorch_cuda.so").is_file() && lib.join("libc10_cuda.so").is_file();
        match cuda {
            Some(incs) if has_cuda_torch && env::var_os("KVGEN_NO_CUDA_GRAPHS").is_none() => {
                let mut b = base(&torch, &abi);
                b.define("KVGEN_CUDA_GRAPHS", None).includes(incs);
                match b.try_compile("kvgen_graph_shim") {
                    Ok(()) => {
                        println!("cargo:rustc-link-search=native={}", lib.display());
                        println!("cargo:rustc-link-lib=dylib=torch_cuda");
                        println!("cargo:rustc-link-lib=dylib=c10_cuda");
                        println!("cargo:rustc-link-lib=dylib=c10");
                        println!("cargo:rustc-link-lib=dylib=torch_cpu");
                    }
                    Err(e) => {
                        println!("cargo:warning=kvgen: the CUDA-graph shim did not compile ({e}); building it as stubs");
                        stub(Some(&torch), &abi)
                    }
                }
            }
            _ => stub(Some(&torch), &abi),
        }
    }

    fn base(torch: &Path, abi: &str) -> cc::Build {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .file(SHIM)
            .include(torch.join("include"))
            .include(torch.join("include/torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
        b
    }

    fn stub(torch: Option<&Path>, abi: &str) {
        let mut b = cc::Build::new();
        b.cpp(true).pic(true).warnings(false).file(SHIM).flag("-std=c++17").flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
        let _ = torch;
        b.compile("kvgen_graph_shim");
    }
}
