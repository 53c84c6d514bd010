//! `erase [--source NAME] IDENTITY` (contract §12): erases a person on the configured queue
//! directly, as `dlq` works on it (beside a running relay or instead of it), with the sources
//! the configuration defines, and prints the [`ErasureReport`] as one JSON line. The Heap
//! deletion it records is made by a running relay's Heap eraser, which picks it up within a
//! second.
//!
//! [`ErasureReport`]: userpilot_heap_relay::erase::ErasureReport

use std::io::IsTerminal;
use std::process::ExitCode;

use userpilot_heap_relay::app;
use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::config::Settings;
use userpilot_heap_relay::erase::{self, EraseError, Progress};
use userpilot_heap_relay::sources::Sources;

pub async fn run(settings: Settings, source: &str, identity: &str) -> anyhow::Result<ExitCode> {
    // Refused before the queue is opened: nothing to erase for no one.
    if identity.is_empty() {
        return Err(EraseError::EmptyIdentity.into());
    }
    let sources = Sources::from_settings(&settings)?;
    let queue = app::open_queue(&settings).await?;
    // Progress only for a person watching: a script's stderr stays one line per error.
    let terminal = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut show = |done: Progress| {
        if terminal {
            eprint!(
                "\rscanned {} webhooks, erased {}",
                done.scanned_webhooks, done.erased_webhooks
            );
            shown = true;
        }
    };
    let outcome = erase::erase(
        queue.as_ref(),
        &sources,
        source,
        identity,
        SystemClock.now_ms(),
        &mut show,
    )
    .await;
    if shown {
        eprintln!();
    }
    println!("{}", serde_json::to_string(&outcome?)?);
    Ok(ExitCode::SUCCESS)
}
