// SPDX-License-Identifier: Apache-2.0
//! Link the guest as a static, freestanding ELF laid out by linker.ld.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        format!("-T{dir}/linker.ld"),
        "-nostartfiles".into(),
        "-nostdlib".into(),
        "-static".into(),
        "-no-pie".into(),
        "-Wl,--build-id=none".into(),
        "-Wl,-z,noexecstack".into(),
        "-Wl,-z,norelro".into(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
