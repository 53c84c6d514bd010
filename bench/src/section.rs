//! What every single-measurement subcommand (`transforms`, `erase`) does around its
//! measurement: a scratch folder for the relay's files, the line saying where and when it ran,
//! and the section printed and written (with its figures as JSON) where asked.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::procfs;

/// A scratch folder, under `dir` when given (a disk other than the default temp folder's).
pub fn scratch(dir: Option<&PathBuf>) -> anyhow::Result<tempfile::TempDir> {
    let builder = tempfile::Builder::new().prefix("relay-bench").to_owned();
    Ok(match dir {
        Some(dir) => builder.tempdir_in(dir)?,
        None => builder.tempdir()?,
    })
}

/// When a measurement started, and the machine's load then: read before it runs.
pub struct Occasion {
    date: String,
    load_before: String,
}

impl Occasion {
    pub fn now() -> Self {
        Self {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            load_before: procfs::load_average(),
        }
    }

    /// The section's first line, once the measurement is over (the load after it is read now).
    pub fn header(&self, commit: &str) -> String {
        format!(
            "Measured {} on {} ({} cores, kernel {}), commit {commit}; load average before {}, \
             after {}.",
            self.date,
            procfs::cpu_model(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            procfs::kernel(),
            self.load_before,
            procfs::load_average()
        )
    }
}

/// Prints the section, and writes it to `out` and the figures to `json` when given.
pub fn publish(
    markdown: &str,
    figures: &impl Serialize,
    out: Option<&Path>,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    println!("{markdown}");
    if let Some(out) = out {
        std::fs::write(out, markdown).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(json) = json {
        std::fs::write(json, serde_json::to_string_pretty(figures)?)
            .with_context(|| format!("cannot write {}", json.display()))?;
    }
    Ok(())
}
