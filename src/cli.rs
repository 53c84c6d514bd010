//! The command line (contract §6): `serve` (the default), `check-config`, `sign`, `send-test`,
//! `preview`, `dlq list|show|replay|purge`, `shapes`, `erase` and `healthcheck`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::dead_letters::FilterParams;

#[derive(Debug, Parser)]
#[command(
    name = "userpilot-heap-relay",
    version,
    about = "Relays signed Userpilot webhooks to Heap, durably."
)]
pub struct Cli {
    /// A TOML file layered over the built-in defaults (environment variables still win).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (the default).
    Serve,
    /// Validate the configuration and print it, secrets redacted; every problem is listed.
    CheckConfig {
        /// Also try what the relay will need: write to the queue, and reach Heap's base URL
        /// (resolve, connect, one HEAD request; no events are sent). Exit code 2 on failure.
        #[arg(long)]
        probe: bool,
    },
    /// Print a valid X-Signature header value for a body file.
    Sign {
        /// The body to sign; `-` reads standard input.
        file: PathBuf,
        /// The webhook secret (default: the first of userpilot.secrets).
        #[arg(long)]
        secret: Option<String>,
        /// Unix seconds to sign with (default: now).
        #[arg(long)]
        timestamp: Option<i64>,
    },
    /// Post a signed sample of every event kind to URL and report each status. Against
    /// production this writes test events into that Heap app: --dry-run shows them instead.
    SendTest {
        /// The relay's webhook URL, e.g. https://relay.example.com/webhooks/userpilot
        #[arg(required_unless_present = "dry_run")]
        url: Option<String>,
        /// The webhook secret (default: the first secret of the source).
        #[arg(long)]
        secret: Option<String>,
        /// The source to test: posts to URL/NAME (unless URL already ends with it), signed
        /// with its first secret (default: the default source, at URL as given).
        #[arg(long)]
        source: Option<String>,
        /// The user id the samples carry.
        #[arg(long, default_value = "relay-send-test")]
        user_id: String,
        /// Post nothing: print the preview of each sample under this configuration (the
        /// Heap requests it would become), as `preview` does.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what the relay would do with a payload under this configuration: the Heap
    /// requests it would send, or why it would quarantine it. Nothing is verified, queued or
    /// sent. Exit code 2 for an unknown source or a payload that is not a JSON object.
    Preview {
        /// The payload; `-` reads standard input.
        file: PathBuf,
        /// The source to preview as (default: the default source).
        #[arg(long)]
        source: Option<String>,
    },
    /// Inspect, replay or purge dead letters (works on the configured queue directly).
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// List the payload shapes received, as JSON lines, newest (last seen) first (works on
    /// the configured queue directly).
    Shapes {
        /// Only the shapes of this source.
        #[arg(long)]
        source: Option<String>,
    },
    /// Erase every trace of a person that the relay holds for a source (contract §12):
    /// their webhooks' bodies, pending and delivered records, dead letters and shape samples.
    /// Works on the configured queue directly; prints what was removed as one JSON line. When
    /// the source has an api_key, a running relay then asks Heap to delete the user too.
    Erase {
        /// The source (default: the default source).
        #[arg(long, default_value = crate::config::DEFAULT_SOURCE)]
        source: String,
        /// The person's identity as Heap knows it (user id, email...), exact bytes.
        identity: String,
    },
    /// Exit 0 when /readyz answers 200 (for container health checks). Needs no secrets: only
    /// server.listen is read, and only without --url.
    Healthcheck {
        /// Readiness URL (default: /readyz on server.listen, via 127.0.0.1 for 0.0.0.0).
        #[arg(long)]
        url: Option<String>,
    },
    /// The relay's own transform worker process (contract §10), started by the relay with an
    /// empty environment and spoken to over its standard input and output; not for people.
    #[command(hide = true)]
    TransformWorker,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters as JSON lines.
    List(Filter),
    /// Print one dead letter as JSON: its record, Heap's answer, attempts, times and the
    /// original webhook body.
    Show {
        /// The dead letter's id (`id` in `dlq list`).
        id: i64,
    },
    /// Re-map dead letters from their original webhook with the current configuration and
    /// queue them again.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Required to replay every dead letter when no filter is given.
        #[arg(long)]
        all: bool,
        /// Print how many dead letters (and webhooks) the replay would take; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters.
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Required to purge every dead letter when no filter is given.
        #[arg(long)]
        all: bool,
        /// Print how many dead letters the purge would delete; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Default, Args)]
pub struct Filter {
    /// One dead letter by id.
    #[arg(long)]
    pub id: Option<i64>,
    /// Reason: no_user_id, no_identity, identity_too_long, no_kind, rejected or expired.
    #[arg(long)]
    pub reason: Option<String>,
    /// The source the webhook came to.
    #[arg(long)]
    pub source: Option<String>,
    /// Heap identity (or account id).
    #[arg(long)]
    pub identity: Option<String>,
    /// Dead since (unix ms or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Dead until (unix ms or RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Only ids above this one (paging).
    #[arg(long)]
    pub after: Option<i64>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl Filter {
    /// The filter as the admin API would receive it (listings; `all` is not a flag there).
    pub fn params(&self) -> FilterParams {
        self.params_with_all(false)
    }

    /// The filter of a replay or purge, with its `--all` flag.
    pub fn params_with_all(&self, all: bool) -> FilterParams {
        FilterParams {
            id: self.id,
            reason: self.reason.clone(),
            source: self.source.clone(),
            identity: self.identity.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            after: self.after,
            limit: self.limit,
            all,
        }
    }
}
