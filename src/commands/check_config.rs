//! `check-config`: the effective configuration, secrets redacted, on standard output.

use std::process::ExitCode;

use userpilot_heap_relay::config::Settings;

pub fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    print!("{}", settings.to_redacted_toml());
    eprintln!("configuration is valid");
    Ok(ExitCode::SUCCESS)
}
