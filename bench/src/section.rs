//! What every single-measurement subcommand (`transforms`, `erase`, `compare`) does around
//! its measurement: a scratch folder for the relay's files, the line saying where and when it
//! ran, and the section printed and written (with its figures as JSON) where asked; and the
//! sections of `BENCHMARKS.md` that only such a subcommand measures, which the suite keeps
//! when it writes the report again ([`keep`]).

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

/// A section of `BENCHMARKS.md` that the suite does not measure: measured alone by a
/// subcommand and pasted in by hand, then kept as it is each time the suite writes the report.
pub struct Kept {
    /// The section's heading line.
    pub heading: &'static str,
    /// How its row of the Targets table, if it has one, begins: that row is kept too.
    pub target_row: Option<&'static str>,
}

/// The kept sections, in the order they go (before `## Targets`).
pub const KEPT: [Kept; 2] = [
    Kept {
        heading: "## Erasure: erasing one person under load",
        target_row: Some("| An erasure of "),
    },
    Kept {
        heading: "## Storage path: old binary against new",
        target_row: None,
    },
];

const TARGETS: &str = "## Targets";

/// The section of `markdown` under `heading`, from its heading line to the next `## `
/// heading (or the end), without the blank lines and `<!-- -->` lines that end it (a comment
/// just before a heading belongs to the section that follows).
pub fn find<'a>(markdown: &'a str, heading: &str) -> Option<&'a str> {
    let start = line_start(markdown, heading)?;
    let body = &markdown[start..];
    let end = body
        .match_indices("\n## ")
        .next()
        .map_or(body.len(), |(at, _)| at + 1);
    let mut section = &body[..end];
    loop {
        let trimmed = section.trim_end();
        match trimmed.rfind('\n') {
            Some(at) if trimmed[at + 1..].starts_with("<!--") => section = &trimmed[..at + 1],
            _ => return Some(trimmed),
        }
    }
}

/// Where the line `line` begins in `markdown`, if it is there as a whole line.
fn line_start(markdown: &str, line: &str) -> Option<usize> {
    let mut offset = 0;
    for text in markdown.split_inclusive('\n') {
        if text.trim_end() == line {
            return Some(offset);
        }
        offset += text.len();
    }
    None
}

/// `fresh`, a report the suite has just rendered, with each [`KEPT`] section of `previous`
/// (the report it replaces) put back before the Targets section, unless `fresh` has that
/// section already, and the kept sections' Targets rows appended to its Targets table.
pub fn keep(previous: &str, fresh: &str) -> String {
    let mut sections = String::new();
    let mut rows = String::new();
    for kept in &KEPT {
        if line_start(fresh, kept.heading).is_some() {
            continue;
        }
        let Some(section) = find(previous, kept.heading) else {
            continue;
        };
        sections.push_str(section);
        sections.push_str("\n\n");
        let row = kept.target_row.and_then(|prefix| {
            find(previous, TARGETS)?
                .lines()
                .find(|line| line.starts_with(prefix))
        });
        if let Some(row) = row {
            rows.push_str(row);
            rows.push('\n');
        }
    }
    let Some(targets) = line_start(fresh, TARGETS) else {
        // No Targets section to put them before: at the end.
        return format!("{fresh}\n{sections}");
    };
    let mut out = String::with_capacity(fresh.len() + sections.len() + rows.len());
    out.push_str(&fresh[..targets]);
    out.push_str(&sections);
    let rest = &fresh[targets..];
    // The Targets table ends at its first blank line after the rows.
    let table_end = rest
        .match_indices("|\n\n")
        .next()
        .map_or(rest.len(), |(at, _)| at + 2);
    out.push_str(&rest[..table_end]);
    out.push_str(&rows);
    out.push_str(&rest[table_end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREVIOUS: &str = "# Benchmarks\n\n## Ingest\n\nold figures\n\n\
        ## Erasure: erasing one person under load\n\nMeasured then.\n\n| run |\n|---|\n\n\
        <!-- relay-bench sources, ... -->\n\n## Cost of routing\n\nrouting\n\n\
        ## Storage path: old binary against new\n\nold against new\n\n\
        ## Targets\n\n| Target | Measured | Verdict |\n|---|---|---|\n| Ingest | 19% | no |\n\
        | An erasure of 10,000 webhooks | 421 ms | **met** |\n\n## Every run\n";

    const FRESH: &str = "# Benchmarks\n\n## Ingest\n\nnew figures\n\n## Cost of routing\n\n\
        routing\n\n## Targets\n\n| Target | Measured | Verdict |\n|---|---|---|\n\
        | Ingest | 25% | no |\n\n## Every run\n";

    #[test]
    fn a_section_ends_before_the_next_heading_and_its_comment() {
        assert_eq!(
            find(PREVIOUS, KEPT[0].heading),
            Some("## Erasure: erasing one person under load\n\nMeasured then.\n\n| run |\n|---|")
        );
        assert_eq!(
            find(PREVIOUS, KEPT[1].heading),
            Some("## Storage path: old binary against new\n\nold against new")
        );
        assert_eq!(find(FRESH, KEPT[1].heading), None);
    }

    #[test]
    fn kept_sections_and_their_rows_survive_a_new_report() {
        let kept = keep(PREVIOUS, FRESH);
        assert_eq!(
            kept,
            "# Benchmarks\n\n## Ingest\n\nnew figures\n\n## Cost of routing\n\nrouting\n\n\
             ## Erasure: erasing one person under load\n\nMeasured then.\n\n| run |\n|---|\n\n\
             ## Storage path: old binary against new\n\nold against new\n\n\
             ## Targets\n\n| Target | Measured | Verdict |\n|---|---|---|\n| Ingest | 25% | no |\n\
             | An erasure of 10,000 webhooks | 421 ms | **met** |\n\n## Every run\n"
        );
        // Kept again, nothing doubles.
        assert_eq!(keep(&kept, &kept), kept);
        // Nothing to keep: the fresh report as it is.
        assert_eq!(keep("", FRESH), FRESH);
    }
}
