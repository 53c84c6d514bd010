//! Configuration (SPEC §5): the embedded `config/default.toml`, an optional `--config` file,
//! then `RELAY_<SECTION>__<KEY>` environment variables, later layers winning. Loaded and
//! validated once at startup into [`Settings`]; a bad value stops startup with one line naming
//! the key. Secrets are [`Secret`]s, so printing the settings never shows them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::builder::DefaultState;
use config::{Config, ConfigBuilder, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::heap::mapping::MappingSettings;
use crate::secret::Secret;

/// The defaults, built into the binary so it runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub userpilot: UserpilotSettings,
    pub heap: HeapSettings,
    pub retry: RetrySettings,
    pub queue: QueueSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    #[serde(default)]
    pub mapping: RawMapping,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserpilotSettings {
    #[serde(deserialize_with = "comma_list")]
    pub secrets: Vec<Secret>,
    pub tolerance_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapSettings {
    pub app_id: String,
    pub base_url: String,
    pub identity: String,
    pub batch_max_events: usize,
    pub batch_linger_ms: u64,
    pub timeout_ms: u64,
    pub events_per_minute: u32,
    pub identity_events_per_minute: u32,
    pub user_properties: bool,
    pub account_properties: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub max_event_age_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub backend: Backend,
    pub path: PathBuf,
    pub postgres_url: Secret,
    pub dedup_window_secs: u64,
    pub dead_letter_retention_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub token: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// `[mapping]` as written: `rename` is a table in files, and a `Old=New;Other=New` string in
/// the environment, where table keys with spaces and parentheses cannot be spelled.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    #[serde(default)]
    pub rename: Renames,
    #[serde(default, deserialize_with = "comma_list")]
    pub drop: Vec<String>,
}

/// A list written as a TOML array, or as one comma-separated string (the environment's form).
/// Values are kept as written: no number or boolean parsing, so an app id or a secret that
/// looks like a number stays exactly what the operator typed.
fn comma_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(deserializer)? {
        Either::List(items) => items.into_iter().map(T::from).collect(),
        Either::Text(text) if text.is_empty() => Vec::new(),
        Either::Text(text) => text.split(',').map(|s| T::from(s.to_owned())).collect(),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Renames {
    Table(BTreeMap<String, String>),
    Inline(String),
}

impl Default for Renames {
    fn default() -> Self {
        Renames::Table(BTreeMap::new())
    }
}

impl Settings {
    /// Loads the layers and validates the result. `file` is the `--config` path, if any.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut layers = defaults();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            layers = layers.add_source(File::from(path).format(FileFormat::Toml));
        }
        let env = Environment::with_prefix("RELAY")
            .prefix_separator("_")
            .separator("__");
        Self::from_layers(layers.add_source(env))
    }

    /// The defaults with `overrides` (TOML) on top, no environment: for tests and tools.
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        Self::from_layers(defaults().add_source(File::from_str(overrides, FileFormat::Toml)))
    }

    fn from_layers(layers: ConfigBuilder<DefaultState>) -> Result<Self, ConfigError> {
        let settings: Settings = layers
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| ConfigError::Load(describe(&e)))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.userpilot.secrets.iter().all(Secret::is_empty) {
            return Err(invalid(
                "userpilot.secrets",
                "is required: set at least one webhook secret (RELAY_USERPILOT__SECRETS)",
            ));
        }
        if self.userpilot.secrets.iter().any(Secret::is_empty) {
            return Err(invalid("userpilot.secrets", "contains an empty secret"));
        }
        if self.heap.app_id.trim().is_empty() {
            return Err(invalid(
                "heap.app_id",
                "is required: set your Heap environment id (RELAY_HEAP__APP_ID)",
            ));
        }
        match reqwest::Url::parse(&self.heap.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            _ => return Err(invalid("heap.base_url", "must be an http(s) URL")),
        }
        if self.heap.identity.trim().is_empty() {
            return Err(invalid(
                "heap.identity",
                "must name `user_id` or a user property",
            ));
        }
        if !(1..=1000).contains(&self.heap.batch_max_events) {
            return Err(invalid(
                "heap.batch_max_events",
                "must be between 1 and 1000",
            ));
        }
        for (key, value) in [
            ("heap.timeout_ms", self.heap.timeout_ms),
            (
                "heap.events_per_minute",
                u64::from(self.heap.events_per_minute),
            ),
            (
                "heap.identity_events_per_minute",
                u64::from(self.heap.identity_events_per_minute),
            ),
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            ("retry.initial_backoff_ms", self.retry.initial_backoff_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        if self.retry.max_backoff_ms < self.retry.initial_backoff_ms {
            return Err(invalid(
                "retry.max_backoff_ms",
                "must be at least retry.initial_backoff_ms",
            ));
        }
        if self.queue.dedup_window_secs < self.userpilot.tolerance_secs {
            // A replayed webhook is recognised only while its first delivery is remembered;
            // within the tolerance an attacker could otherwise replay a captured request.
            return Err(invalid(
                "queue.dedup_window_secs",
                "must be at least userpilot.tolerance_secs",
            ));
        }
        match self.queue.backend {
            Backend::Sqlite if self.queue.path.as_os_str().is_empty() => {
                return Err(invalid("queue.path", "is required for the sqlite backend"));
            }
            Backend::Postgres if self.queue.postgres_url.is_empty() => {
                return Err(invalid(
                    "queue.postgres_url",
                    "is required for the postgres backend",
                ));
            }
            _ => {}
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", "is not a valid filter (try \"info\")"));
        }
        self.mapping().map(|_| ())
    }

    /// The `[mapping]` section in its parsed form.
    pub fn mapping(&self) -> Result<MappingSettings, ConfigError> {
        let rename = match &self.mapping.rename {
            Renames::Table(table) => table.clone(),
            Renames::Inline(text) => parse_renames(text)?,
        };
        Ok(MappingSettings {
            rename,
            drop: self.mapping.drop.clone(),
        })
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }

    /// The effective configuration as TOML, secrets redacted (`check-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// The first layer: the built-in defaults.
fn defaults() -> ConfigBuilder<DefaultState> {
    Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
}

/// `Old name=New name;Other=Another` -> table.
fn parse_renames(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut renames = BTreeMap::new();
    for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((from, to)) = pair.split_once('=') else {
            return Err(invalid(
                "mapping.rename",
                format!("expects `Old name=New name;...`, got `{pair}`"),
            ));
        };
        renames.insert(from.trim().to_owned(), to.trim().to_owned());
    }
    Ok(renames)
}

/// Keys whose values must never be printed, not even in an error.
const SECRET_KEYS: [&str; 3] = ["userpilot.secrets", "admin.token", "queue.postgres_url"];

/// What an enum-valued key accepts, for the error message.
const CHOICES: [(&str, &str); 2] = [
    ("log.format", "`json` or `pretty`"),
    ("queue.backend", "`sqlite` or `postgres`"),
];

/// Turns the `config` crate's error into one line naming the key. Its messages put the key
/// after "for key"; an unknown key reads "unknown field `x`" with the section as the key.
/// Serde quotes the offending value, so for secret keys the message is replaced entirely.
fn describe(error: &config::ConfigError) -> String {
    let text = error.to_string();
    let key = text
        .rsplit_once("for key `")
        .and_then(|(_, k)| k.split('`').next())
        .filter(|k| !k.is_empty());
    if let Some((_, rest)) = text.split_once("unknown field ") {
        let field = rest.split('`').nth(1).unwrap_or(rest);
        return match key {
            Some(section) => format!("unknown key `{section}.{field}`"),
            None => format!("unknown key `{field}`"),
        };
    }
    let Some(key) = key else {
        return text;
    };
    if SECRET_KEYS.contains(&key) {
        return format!("`{key}` has an invalid value (not shown: it is a secret)");
    }
    match CHOICES.iter().find(|(k, _)| *k == key) {
        Some((_, choices)) => format!("`{key}` must be {choices}"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_parse_from_the_inline_form() {
        let renames = parse_renames("Userpilot NPS (ask later)=NPS later; A = B ;").unwrap();
        assert_eq!(renames.len(), 2);
        assert_eq!(renames["Userpilot NPS (ask later)"], "NPS later");
        assert_eq!(renames["A"], "B");
        assert!(parse_renames("no separator").is_err());
    }

    #[test]
    fn the_embedded_defaults_parse_and_only_lack_the_required_keys() {
        let settings: Settings = defaults()
            .build()
            .and_then(Config::try_deserialize)
            .unwrap();
        let err = settings.validate().unwrap_err().to_string();
        assert!(err.contains("userpilot.secrets"), "{err}");
    }
}
