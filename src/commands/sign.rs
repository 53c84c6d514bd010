//! `sign`: a valid `X-Signature` value for a body, for trying a deployment with curl.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::userpilot;

/// Signs the body in `file` (`-`: standard input) at `timestamp` (default: now).
pub fn run(file: &Path, secret: &str, timestamp: Option<i64>) -> anyhow::Result<ExitCode> {
    let body = if file.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        body
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let t = timestamp.unwrap_or_else(|| SystemClock.now().timestamp());
    println!("{}", userpilot::sign(&body, secret, t));
    Ok(ExitCode::SUCCESS)
}
