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
use userpilot_heap_relay::ingest::PrepareError;
use userpilot_heap_relay::preview::{self, Preview};
use userpilot_heap_relay::sources::{Source, Sources};

/// The exit code for a preview that cannot be made: an unknown source, a payload that is not
/// a JSON object.
pub const REFUSED: u8 = 2;

/// What a configuration previews payloads with.
pub struct Previewer {
    sources: Sources,
    batch_size: usize,
}

/// Why a payload could not be previewed; one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no source `{name}` is configured (the sources are: {known})")]
    UnknownSource { name: String, known: String },
    #[error("the payload is not a JSON object")]
    InvalidJson,
    #[error("the transform could not run: {0}")]
    Transform(String),
}

impl Previewer {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            sources: Sources::from_settings(settings)?,
            batch_size: preview::batch_size(&settings.heap),
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
        let transforms = self.sources.transforms();
        preview::preview(source, payload, now, self.batch_size, transforms)
            .await
            .map_err(|error| match error {
                PrepareError::InvalidJson => Refused::InvalidJson,
                other => Refused::Transform(other.to_string()),
            })
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
