//! The subcommands of the binary (contract §6), one module each; [`run`] picks the one the
//! command line names. They are the imperative shell around the library: they read files,
//! standard input, the environment and the network, print, and choose the exit code.

mod check_config;
mod dlq;
mod erase;
mod healthcheck;
mod preview;
mod send_test;
mod serve;
mod shapes;
mod sign;

use std::process::ExitCode;

use anyhow::{Context, bail};

use userpilot_heap_relay::cli::{Cli, Command};
use userpilot_heap_relay::config::{DEFAULT_SOURCE, Settings};

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        None | Some(Command::Serve) => serve::run(settings(&cli)?, cli.config.clone()).await,
        Some(Command::CheckConfig { probe }) => check_config::run(&settings(&cli)?, *probe).await,
        Some(Command::Sign {
            file,
            secret,
            timestamp,
        }) => sign::run(
            file,
            &secret_or_configured(&cli, secret.as_deref())?,
            *timestamp,
        ),
        Some(Command::SendTest {
            url,
            secret,
            source,
            user_id,
            dry_run,
        }) => {
            let source = source.as_deref();
            let url = match url {
                Some(url) if !dry_run => url,
                // Nothing is posted: no URL or secret is needed, the configuration is.
                _ => {
                    return send_test::dry_run(&settings(&cli)?, source, user_id).await;
                }
            };
            let secret = match secret {
                Some(secret) => secret.clone(),
                None => source_secret(&cli, source.unwrap_or(DEFAULT_SOURCE))?,
            };
            send_test::run(&send_test::source_url(url, source)?, &secret, user_id).await
        }
        Some(Command::Preview { file, source }) => {
            preview::run(&settings(&cli)?, source.as_deref(), file).await
        }
        Some(Command::Dlq { action }) => dlq::run(settings(&cli)?, action).await,
        Some(Command::Shapes { source }) => shapes::run(settings(&cli)?, source.as_deref()).await,
        Some(Command::Erase { source, identity }) => {
            erase::run(settings(&cli)?, source, identity).await
        }
        Some(Command::Healthcheck { url }) => {
            // Only the address: a health check must not fail on a secret it never uses.
            let url = match url {
                Some(url) => url.clone(),
                None => {
                    healthcheck::readiness_url(Settings::listen_address(cli.config.as_deref())?)
                }
            };
            healthcheck::run(&url).await
        }
        Some(Command::TransformWorker) => Ok(transform_worker()),
    }
}

/// `transform-worker`: serves the relay that started it until it closes the pipe.
pub fn transform_worker() -> ExitCode {
    match userpilot_heap_relay::transform::worker::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Loads the configuration or explains in one line why not.
fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    Ok(Settings::load(cli.config.as_deref())?)
}

/// The first configured secret of source `name`.
fn source_secret(cli: &Cli, name: &str) -> anyhow::Result<String> {
    let settings = settings(cli).context("no --secret given and no usable configuration")?;
    let sources = settings.sources();
    let Some(source) = sources.iter().find(|s| s.name.to_string() == name) else {
        let known: Vec<String> = sources.iter().map(|s| s.name.to_string()).collect();
        bail!(
            "no source `{name}` is configured (the sources are: {})",
            known.join(", ")
        );
    };
    match source.secrets.first() {
        Some(secret) => Ok(secret.expose().to_owned()),
        None => bail!("no --secret given and source `{name}` has no secret"),
    }
}

/// The secret given on the command line, else the first configured webhook secret.
fn secret_or_configured(cli: &Cli, secret: Option<&str>) -> anyhow::Result<String> {
    match secret {
        Some(secret) => Ok(secret.to_owned()),
        None => {
            let settings =
                settings(cli).context("no --secret given and no usable configuration")?;
            match settings.userpilot.secrets.first() {
                Some(secret) => Ok(secret.expose().to_owned()),
                None => bail!("no --secret given and userpilot.secrets is empty"),
            }
        }
    }
}
