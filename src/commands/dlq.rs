//! `dlq list|replay|purge`: the dead letters, on the configured queue directly (beside a
//! running relay or instead of it). What a replay or purge applies to is decided by
//! [`FilterParams::selection`], the same rule as the admin API's.
//!
//! [`FilterParams::selection`]: userpilot_heap_relay::dead_letters::FilterParams::selection

use std::process::ExitCode;

use userpilot_heap_relay::cli::DlqCommand;
use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::config::Settings;
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
        DlqCommand::Replay { filter, all } => {
            let selection = filter.params_with_all(*all).selection()?;
            let mapper = app::mapper(&settings)?;
            let queue = app::open_queue(&settings).await?;
            let summary =
                dead_letters::replay(queue.as_ref(), &mapper, selection, SystemClock.now()).await?;
            println!("{}", serde_json::to_string(&summary)?);
        }
        DlqCommand::Purge { filter, all } => {
            let selection = filter.params_with_all(*all).selection()?;
            let queue = app::open_queue(&settings).await?;
            let purged = queue.purge(selection).await?;
            println!("{}", serde_json::json!({ "purged": purged }));
        }
    }
    Ok(ExitCode::SUCCESS)
}
