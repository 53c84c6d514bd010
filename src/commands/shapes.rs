//! `shapes [--source NAME]`: the payload shapes stored in the configured queue (contract §6,
//! §10.4), one JSON object a line, newest (last seen) first. Opens the queue without serving,
//! as `dlq` does, so it works beside a running relay.

use std::process::ExitCode;

use userpilot_heap_relay::app;
use userpilot_heap_relay::config::Settings;

pub async fn run(settings: Settings, source: Option<&str>) -> anyhow::Result<ExitCode> {
    let queue = app::open_queue(&settings).await?;
    for shape in queue.shapes(source.map(str::to_owned)).await? {
        println!("{}", serde_json::to_string(&shape)?);
    }
    Ok(ExitCode::SUCCESS)
}
