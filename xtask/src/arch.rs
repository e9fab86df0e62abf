//! The architectures tcptrace ships for, and how to build for one that is not this
//! machine's: rustup's standard library for the target, Debian's cross gcc as the
//! linker (named per invocation, not in `.cargo/config.toml`, where it would also
//! apply to a native build on a host whose gcc has another name).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{apt_install, has, output, run_cmd, step};

/// A Debian (and OCI) architecture name, as `--arch` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// This machine's, if tcptrace ships for it.
    pub fn native() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// From Debian's name for it.
    pub fn from_debian(name: &str) -> Option<Arch> {
        Self::ALL.into_iter().find(|a| a.debian() == name)
    }

    pub fn is_native(self) -> bool {
        Self::native() == Some(self)
    }

    /// Debian's name (`dpkg --print-architecture`), also the OCI platform's.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Rust's target triple.
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The GNU triplet Debian's cross tools are prefixed with.
    fn gnu(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// The ELF header's `e_machine` of this architecture's executables.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 62,
            Arch::Arm64 => 183,
        }
    }

    /// `strip` for this architecture's binaries.
    pub fn strip(self) -> String {
        if self.is_native() {
            "strip".to_owned()
        } else {
            format!("{}-strip", self.gnu())
        }
    }

    /// Where cargo puts this architecture's `profile` (release, debug) build.
    pub fn target_dir(self, root: &Path, profile: &str) -> PathBuf {
        if self.is_native() {
            root.join("target").join(profile)
        } else {
            root.join("target").join(self.triple()).join(profile)
        }
    }

    /// A cargo command (`args` first: the subcommand) building for this architecture:
    /// `--target` and the cross linker when it is not this machine's, nothing when it
    /// is (so native builds share `target/release` with every other command).
    pub fn cargo(self, args: &[&str]) -> Command {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(args);
        if !self.is_native() {
            cmd.args(["--target", self.triple()]);
            let var = format!("CARGO_TARGET_{}_LINKER", self.triple().to_uppercase().replace('-', "_"));
            cmd.env(var, format!("{}-gcc", self.gnu()));
        }
        cmd
    }

    /// Installs what building for this architecture needs and this machine lacks:
    /// rustup's standard library for the target, and Debian's cross gcc (which brings
    /// the cross binutils, `strip` among them).
    pub fn setup(self) -> Result<()> {
        if self.is_native() {
            return Ok(());
        }
        let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
        if installed.lines().any(|l| l.trim() == self.triple()) {
            step(&format!("Rust target {}: present", self.triple()));
        } else {
            step(&format!("Rust target {}: installing", self.triple()));
            run_cmd(Command::new("rustup").args(["target", "add", self.triple()]))
                .context("rustup could not add the target; check the network")?;
        }
        let gcc = format!("{}-gcc", self.gnu());
        if has(&gcc) && has(&self.strip()) {
            step(&format!("cross linker {gcc}: present"));
            return Ok(());
        }
        let package = format!("gcc-{}", self.gnu().replace('_', "-"));
        apt_install(&[&package, &format!("libc6-dev-{}-cross", self.debian())])?;
        if !has(&gcc) {
            bail!("{package} was installed but {gcc} is not on PATH");
        }
        Ok(())
    }
}

/// `--arch` values, or every architecture when none is given.
pub fn or_all(arches: &[Arch]) -> Vec<Arch> {
    if arches.is_empty() {
        Arch::ALL.to_vec()
    } else {
        let mut v = arches.to_vec();
        v.dedup();
        v
    }
}

/// The `e_machine` field of an ELF file, or why it has none.
pub fn elf_machine(path: &Path) -> Result<u16> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" || bytes[5] != 1 {
        bail!("{} is not a little-endian ELF file", path.display());
    }
    Ok(u16::from_le_bytes([bytes[18], bytes[19]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree() {
        for arch in Arch::ALL {
            assert!(arch.triple().starts_with(arch.gnu().split('-').next().unwrap()));
        }
        assert_eq!(Arch::Arm64.debian(), "arm64");
        assert_eq!(Arch::from_debian("arm64"), Some(Arch::Arm64));
        assert_eq!(Arch::from_debian("riscv64"), None);
        assert_eq!(or_all(&[]), Arch::ALL);
        assert_eq!(or_all(&[Arch::Arm64, Arch::Arm64]), [Arch::Arm64]);
        let cmd = Arch::Arm64.cargo(&["build"]);
        if !Arch::Arm64.is_native() {
            let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            assert_eq!(args, ["build", "--target", "aarch64-unknown-linux-gnu"]);
            assert!(cmd.get_envs().any(|(k, _)| k == "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER"));
        }
    }

    #[test]
    fn elf_header() {
        let own = std::env::current_exe().unwrap();
        assert_eq!(elf_machine(&own).unwrap(), Arch::native().unwrap().elf_machine());
        let dir = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        std::fs::write(&dir, b"#!/bin/sh\n").unwrap();
        assert!(elf_machine(&dir).is_err());
        let _ = std::fs::remove_file(&dir);
    }
}
