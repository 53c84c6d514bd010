//! Build script: lets the Postgres integration tests know whether a server was named when they
//! were built. With `RELAY_TEST_POSTGRES_URL` set it turns on `cfg(postgres_tests)`; without it
//! those tests carry `#[ignore]` and show as "ignored" rather than passing without running.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rerun-if-env-changed=RELAY_TEST_POSTGRES_URL");
    // Only this file's changes matter to the script itself; without a `rerun-if-changed` line
    // cargo would rerun it whenever any file of the package changed.
    println!("cargo::rerun-if-changed=build.rs");
    let set = std::env::var("RELAY_TEST_POSTGRES_URL").is_ok_and(|url| !url.trim().is_empty());
    if set {
        println!("cargo::rustc-cfg=postgres_tests");
    }
}
