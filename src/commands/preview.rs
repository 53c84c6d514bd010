//! `preview [--source NAME] FILE` (contract §10.3): what the relay configured like this would do
//! with the payload in FILE (`-`: standard input), received now — the Heap requests as JSON
//! on standard output, or the quarantine reason, or `filtered`. Nothing is verified, queued or
//! sent, and no relay needs to run: the configuration files and environment are read here.
//! `send-test --dry-run` prints the same for each sample.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;

use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::config::{DEFAULT_SOURCE, Settings};
use userpilot_heap_relay::preview::{self, Preview, Transforms};
use userpilot_heap_relay::sources::{Source, Sources};

/// The exit code for a preview that cannot be made: an unknown source, a payload that is not
/// a JSON object.
pub const REFUSED: u8 = 2;

/// What a configuration previews payloads with.
pub struct Previewer {
    sources: Sources,
    batch_size: usize,
    transforms: Transforms,
}

/// Why a payload could not be previewed; one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no source `{name}` is configured (the sources are: {known})")]
    UnknownSource { name: String, known: String },
    #[error("the payload is not a JSON object")]
    InvalidJson,
}

impl Previewer {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            sources: Sources::from_settings(settings)?,
            batch_size: preview::batch_size(&settings.heap),
            // stand-in until ingest::prepare: the sources' compiled transforms then.
            transforms: Transforms,
        })
    }

    /// The source `name`, or why there is none.
    pub fn source(&self, name: &str) -> Result<&Source, Refused> {
        self.sources.get(name).map(|s| s.as_ref()).ok_or_else(|| {
            let known: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
            Refused::UnknownSource {
                name: name.to_owned(),
                known: known.join(", "),
            }
        })
    }

    /// `payload` as `source` would receive it now.
    pub async fn preview(&self, source: &Source, payload: Bytes) -> Result<Preview, Refused> {
        let now = SystemClock.now();
        preview::preview(source, payload, now, self.batch_size, &self.transforms)
            .await
            .map_err(|_| Refused::InvalidJson)
    }
}

pub async fn run(
    settings: &Settings,
    source: Option<&str>,
    file: &Path,
) -> anyhow::Result<ExitCode> {
    let previewer = Previewer::new(settings)?;
    let source = match previewer.source(source.unwrap_or(DEFAULT_SOURCE)) {
        Ok(source) => source,
        Err(refused) => return Ok(refuse(&refused)),
    };
    let payload = if file.as_os_str() == "-" {
        let mut payload = Vec::new();
        std::io::stdin()
            .read_to_end(&mut payload)
            .context("cannot read standard input")?;
        payload
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    match previewer.preview(source, Bytes::from(payload)).await {
        Ok(preview) => {
            println!("{}", serde_json::to_string_pretty(&preview.to_json())?);
            Ok(ExitCode::SUCCESS)
        }
        Err(refused) => Ok(refuse(&refused)),
    }
}

/// One line on standard error, exit code [`REFUSED`].
pub fn refuse(refused: &Refused) -> ExitCode {
    eprintln!("error: {refused}");
    ExitCode::from(REFUSED)
}
