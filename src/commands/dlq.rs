//! `dlq list|show|replay|purge`: the dead letters, on the configured queue directly (beside a
//! running relay or instead of it: it opens the queue without serving, so it takes no
//! serving lock and never releases the relay's leases). What a replay or purge applies to is
//! decided by [`FilterParams::selection`], the same rule as the admin API's; `--dry-run`
//! counts it and changes nothing.
//!
//! [`FilterParams::selection`]: userpilot_heap_relay::dead_letters::FilterParams::selection

use std::io::IsTerminal;
use std::process::ExitCode;

use userpilot_heap_relay::cli::DlqCommand;
use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::config::Settings;
use userpilot_heap_relay::dead_letters::ReplaySummary;
use userpilot_heap_relay::sources::Sources;
use userpilot_heap_relay::{app, dead_letters};

pub async fn run(settings: Settings, action: &DlqCommand) -> anyhow::Result<ExitCode> {
    match action {
        DlqCommand::List(filter) => {
            let listing = filter.params().listing()?;
            let queue = app::open_queue(&settings).await?;
            for letter in queue.dead_letters(listing).await? {
                println!("{}", serde_json::to_string(&letter)?);
            }
        }
        DlqCommand::Show { id } => {
            let queue = app::open_queue(&settings).await?;
            match dead_letters::show(queue.as_ref(), *id).await? {
                Some(view) => println!("{}", serde_json::to_string_pretty(&view)?),
                None => {
                    eprintln!("error: no dead letter with id {id}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        DlqCommand::Replay {
            filter,
            all,
            dry_run,
        } => {
            let selection = filter.params_with_all(*all).selection()?;
            let sources = Sources::from_settings(&settings)?;
            let queue = app::open_queue(&settings).await?;
            if *dry_run {
                let count = queue.count_dead_letters(selection).await?;
                println!(
                    "{}",
                    serde_json::json!({ "dry_run": true, "would_replay": count })
                );
                return Ok(ExitCode::SUCCESS);
            }
            // Progress only for a person watching: a script's stderr stays one line per error.
            let summary = if std::io::stderr().is_terminal() {
                let total = queue.count_dead_letters(selection.clone()).await?.webhooks;
                let mut show = |done: &ReplaySummary| {
                    eprint!("\rreplayed {}/{total} webhooks", done.webhooks);
                };
                let summary = dead_letters::replay_with_progress(
                    queue.as_ref(),
                    &sources,
                    selection,
                    SystemClock.now(),
                    &mut show,
                )
                .await?;
                eprintln!();
                summary
            } else {
                dead_letters::replay(queue.as_ref(), &sources, selection, SystemClock.now()).await?
            };
            println!("{}", serde_json::to_string(&summary)?);
        }
        DlqCommand::Purge {
            filter,
            all,
            dry_run,
        } => {
            let selection = filter.params_with_all(*all).selection()?;
            let queue = app::open_queue(&settings).await?;
            if *dry_run {
                let count = queue.count_dead_letters(selection).await?;
                println!(
                    "{}",
                    serde_json::json!({ "dry_run": true, "would_purge": count.dead_letters })
                );
                return Ok(ExitCode::SUCCESS);
            }
            let purged = queue.purge(selection).await?;
            println!("{}", serde_json::json!({ "purged": purged }));
        }
    }
    Ok(ExitCode::SUCCESS)
}
