//! Link options of the `peersync` executable.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Packed relative relocations (DT_RELR, binutils >= 2.38, glibc >= 2.36): the position-
        // independent executable's ~29,000 relative relocations take a few KiB instead of ~700 KiB,
        // which the loader reads through at every start and which then count in the node's RSS.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
