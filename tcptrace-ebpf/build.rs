//! Fails early, with the fix, when bpf-linker is missing (cargo's own error is obscure).
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        panic!("bpf-linker is not on PATH; run `cargo xtask setup` (or `cargo xtask run`) to build it");
    }
}
