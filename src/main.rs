//! The binary: parse the command line, load the configuration, run the chosen command.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use userpilot_heap_relay::cli::{Cli, Command, DlqCommand, Filter};
use userpilot_heap_relay::config::Settings;
use userpilot_heap_relay::{app, dead_letters, samples, telemetry, userpilot};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the configuration or explains in one line why not.
fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    Ok(Settings::load(cli.config.as_deref())?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        None | Some(Command::Serve) => serve(settings(&cli)?).await,
        Some(Command::CheckConfig) => {
            let settings = settings(&cli)?;
            print!("{}", settings.to_redacted_toml());
            eprintln!("configuration is valid");
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Sign {
            file,
            secret,
            timestamp,
        }) => {
            let body = if file.as_os_str() == "-" {
                let mut body = Vec::new();
                std::io::stdin().read_to_end(&mut body)?;
                body
            } else {
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let secret = secret_or_configured(&cli, secret.as_deref())?;
            let t = timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp());
            println!("{}", userpilot::sign(&body, &secret, t));
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::SendTest {
            url,
            secret,
            user_id,
        }) => {
            let secret = secret_or_configured(&cli, secret.as_deref())?;
            send_test(url, &secret, user_id).await
        }
        Some(Command::Dlq { action }) => dlq(settings(&cli)?, action).await,
        Some(Command::Healthcheck { url }) => {
            let url = match url {
                Some(url) => url.clone(),
                None => {
                    let listen = settings(&cli)?.server.listen;
                    let host = if listen.ip().is_unspecified() {
                        "127.0.0.1".to_owned()
                    } else {
                        listen.ip().to_string()
                    };
                    format!("http://{host}:{}/readyz", listen.port())
                }
            };
            healthcheck(&url).await
        }
    }
}

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

async fn serve(settings: Settings) -> anyhow::Result<ExitCode> {
    telemetry::init_tracing(&settings.log);
    let app = match app::App::build(settings).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return Ok(ExitCode::FAILURE);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match app.run(shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            tracing::error!(%error, "relay failed");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    shutdown.cancel();
}

async fn send_test(url: &str, secret: &str, user_id: &str) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let now = chrono::Utc::now().timestamp();
    let nonce = uuid::Uuid::new_v4().to_string();
    let mut failures = 0;
    for (label, body) in samples::all(user_id, now, &nonce) {
        let body = serde_json::to_vec(&body)?;
        let signature = userpilot::sign(&body, secret, now);
        let result = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-signature", signature)
            .body(body)
            .send()
            .await;
        match result {
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if status.as_u16() != 202 {
                    failures += 1;
                }
                println!("{label:<26} {} {text}", status.as_u16());
            }
            Err(error) => {
                failures += 1;
                println!("{label:<26} error: {error}");
            }
        }
    }
    if failures > 0 {
        eprintln!("{failures} sample(s) were not accepted");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("all samples accepted");
    Ok(ExitCode::SUCCESS)
}

async fn healthcheck(url: &str) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    match client.get(url).send().await {
        Ok(response) if response.status().as_u16() == 200 => Ok(ExitCode::SUCCESS),
        Ok(response) => {
            eprintln!("not ready: {} answered {}", url, response.status());
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            eprintln!("not ready: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn confirm_scope(filter: &Filter, all: bool, verb: &str) -> anyhow::Result<()> {
    if filter.is_empty() && !all {
        bail!("refusing to {verb} every dead letter without --all (or give a filter)");
    }
    Ok(())
}

async fn dlq(settings: Settings, action: &DlqCommand) -> anyhow::Result<ExitCode> {
    let queue = app::open_queue(&settings).await?;
    match action {
        DlqCommand::List(filter) => {
            let filter = filter.params().to_filter(true)?;
            for letter in queue.dead_letters(filter).await? {
                println!("{}", serde_json::to_string(&letter)?);
            }
        }
        DlqCommand::Replay { filter, all } => {
            confirm_scope(filter, *all, "replay")?;
            let mapper = app::mapper(&settings)?;
            let summary = dead_letters::replay(
                queue.as_ref(),
                &mapper,
                filter.params().to_filter(false)?,
                chrono::Utc::now(),
            )
            .await?;
            println!("{}", serde_json::to_string(&summary)?);
        }
        DlqCommand::Purge { filter, all } => {
            confirm_scope(filter, *all, "purge")?;
            let purged = queue.purge(filter.params().to_filter(false)?).await?;
            println!("{}", serde_json::json!({ "purged": purged }));
        }
    }
    Ok(ExitCode::SUCCESS)
}
