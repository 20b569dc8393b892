//! In `module` mode nothing links LuaJIT: the host process provides it. The
//! library keeps it that way (no NEEDED entry for LuaJIT, so nginx and the
//! `luajit` CLI use their own), but this crate's example binaries (the
//! in-process benchmark) are hosts too, so they link the system LuaJIT
//! (Debian `libluajit2-5.1-dev`). In `vendored` mode the LuaJIT built from
//! source is linked into everything, examples included.

fn main() {
    if std::env::var_os("CARGO_FEATURE_MODULE").is_some() {
        println!("cargo:rustc-link-arg-examples=-lluajit-5.1");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
