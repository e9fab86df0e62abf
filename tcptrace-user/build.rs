//! Builds the eBPF object (`tcptrace-ebpf`) with aya-build and leaves it in `OUT_DIR`
//! for `include_bytes_aligned!`, so the daemon is one self-contained file.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("tcptrace-user has no parent directory")?;
    let ebpf_dir = root.join("tcptrace-ebpf");
    let common_dir = root.join("tcptrace-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());

    // `AYA_BUILD_SKIP=1` (clippy, docs, machines without bpf-linker): aya-build writes
    // nothing, so leave an empty object that the loader rejects with a clear error.
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var("OUT_DIR")?).join("tcptrace");
        fs::write(&out, []).with_context(|| format!("writing {}", out.display()))?;
    }
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to tcptrace-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "tcptrace-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object failed; run `cargo xtask setup` to install rust-src and bpf-linker")
}
