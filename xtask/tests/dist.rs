//! `cargo xtask dist`: the shipped binary is static and does what the cargo build does.

use std::process::Command;

use qlock_core::Access;
use qlock_testkit::{FakeQemu, Format, TempImage};

/// Whether an ELF64 file asks for a program interpreter (`PT_INTERP`): a dynamically linked
/// executable does, a static PIE does not.
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..5], b"\x7fELF\x02", "an ELF64 file");
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| u32::from_le_bytes(elf[phoff + i * phentsize..][..4].try_into().unwrap()) == 3)
}

#[test]
fn the_dist_binary_is_static_and_refuses_as_qemu_does() {
    let dist = xtask::dist::build().unwrap();
    if std::env::var("CI").as_deref() == Ok("true") {
        // `.ci/run` installs the target; without it the build falls back to glibc.
        assert_eq!(dist.libc, "musl", "rustup target add {}", xtask::dist::MUSL);
    }
    let bin = dist.path;
    let elf = std::fs::read(&bin).unwrap();
    assert!(!has_interpreter(&elf), "{} needs no dynamic loader", bin.display());
    let cargo_build = std::fs::read(xtask::qlock_bin::path().unwrap()).unwrap();
    assert!(has_interpreter(&cargo_build), "the check tells a dynamic executable apart");

    let image = TempImage::new(Format::Qcow2).unwrap();
    let free =
        Command::new(&bin).arg("check").arg(image.path()).args(["--access", "write"]).output().unwrap();
    assert!(free.status.success(), "{free:?}");
    let _holder = FakeQemu::builder(image.path()).access(Access::WRITE).spawn().unwrap();
    let busy = Command::new(&bin).arg("check").arg(image.path()).args(["--access", "read"]).output().unwrap();
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
}
