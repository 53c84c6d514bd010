//! Build script, for these things:
//! - lets the Postgres integration tests know whether a server was named when they were built.
//!   With `RELAY_TEST_POSTGRES_URL` set it turns on `cfg(postgres_tests)`; without it those
//!   tests carry `#[ignore]` and show as "ignored" rather than passing without running;
//! - likewise for the console's browser tests: `RELAY_TEST_CHROMEDRIVER` (the path of
//!   ChromeDriver, set by `.ci/browser.sh`) turns on `cfg(browser_tests)`;
//! - names the commit built, for `relay_build_info{commit}`: `USERPILOT_HEAP_RELAY_COMMIT` when
//!   set (a container build has no `.git`: pass it in; not a `RELAY_*` name, since the relay
//!   reads every `RELAY_*` variable as configuration), else `git rev-parse --short HEAD`. Without
//!   either the variable is simply not set and the relay reports `unknown`: never a failed build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rerun-if-env-changed=RELAY_TEST_POSTGRES_URL");
    // Only this file's changes matter to the script itself; without a `rerun-if-changed` line
    // cargo would rerun it whenever any file of the package changed.
    println!("cargo::rerun-if-changed=build.rs");
    if env_set("RELAY_TEST_POSTGRES_URL") {
        println!("cargo::rustc-cfg=postgres_tests");
    }
    println!("cargo::rustc-check-cfg=cfg(browser_tests)");
    println!("cargo::rerun-if-env-changed=RELAY_TEST_CHROMEDRIVER");
    if env_set("RELAY_TEST_CHROMEDRIVER") {
        println!("cargo::rustc-cfg=browser_tests");
    }

    println!("cargo::rerun-if-env-changed=USERPILOT_HEAP_RELAY_COMMIT");
    let commit = std::env::var("USERPILOT_HEAP_RELAY_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    if let Some(commit) = commit {
        println!(
            "cargo::rustc-env=USERPILOT_HEAP_RELAY_COMMIT={}",
            commit.trim()
        );
    }
    for file in head_files() {
        println!("cargo::rerun-if-changed={}", file.display());
    }
}

/// Whether the environment variable `name` is set to something other than blanks.
fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|value| !value.trim().is_empty())
}

/// `git args` in the package's folder, its trimmed output if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

/// The files whose change means another commit is checked out: `HEAD` (a checkout), the
/// branch it names (a commit) and `packed-refs`. Only existing ones: cargo reruns the script
/// at every build for a `rerun-if-changed` path that does not exist. In a worktree, `HEAD`
/// lives in the worktree's git folder and the branches in the common one.
fn head_files() -> Vec<PathBuf> {
    let (Some(git_dir), Some(common_dir)) = (
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ) else {
        return Vec::new();
    };
    let (git_dir, common_dir) = (Path::new(&git_dir), Path::new(&common_dir));
    let mut files = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.push(common_dir.join(branch));
    }
    files.into_iter().filter(|file| file.exists()).collect()
}
