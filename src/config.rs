//! Configuration (contract §5): the embedded `config/default.toml`, an optional `--config` file,
//! then `RELAY_<SECTION>__<KEY>` environment variables, later layers winning. Loaded and
//! validated once at startup into [`Settings`]; a bad value stops startup with one line naming
//! the key. Secrets are [`Secret`]s, so printing the settings never shows them.
//!
//! Values are parsed into the types the rest of the relay uses — `Duration`s (the keys keep
//! their `_ms` / `_secs` names and units, and `check-config` prints them back in those units),
//! non-zero integers where 0 means nothing, a [`Url`] and an [`AppId`] — so nothing downstream
//! converts or re-checks them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

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
    pub telemetry: TelemetrySettings,
    #[serde(default)]
    pub mapping: RawMapping,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(deserialize_with = "non_zero")]
    pub max_body_bytes: NonZeroUsize,
    #[serde(rename = "shutdown_grace_ms", with = "millis")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserpilotSettings {
    #[serde(deserialize_with = "comma_list")]
    pub secrets: Vec<Secret>,
    #[serde(rename = "tolerance_secs", with = "secs")]
    pub tolerance: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapSettings {
    pub app_id: AppId,
    #[serde(with = "http_url")]
    pub base_url: Url,
    pub identity: String,
    /// At most [`MAX_BATCH_EVENTS`].
    #[serde(deserialize_with = "non_zero")]
    pub batch_max_events: NonZeroU32,
    #[serde(rename = "batch_linger_ms", with = "millis")]
    pub batch_linger: Duration,
    #[serde(rename = "timeout_ms", with = "non_zero_millis")]
    pub timeout: Duration,
    #[serde(deserialize_with = "non_zero")]
    pub events_per_minute: NonZeroU32,
    #[serde(deserialize_with = "non_zero")]
    pub identity_events_per_minute: NonZeroU32,
    pub user_properties: bool,
    pub account_properties: bool,
}

/// The most events Heap takes in one bulk request.
pub const MAX_BATCH_EVENTS: u32 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(rename = "initial_backoff_ms", with = "non_zero_millis")]
    pub initial_backoff: Duration,
    #[serde(rename = "max_backoff_ms", with = "millis")]
    pub max_backoff: Duration,
    #[serde(rename = "max_event_age_secs", with = "secs")]
    pub max_event_age: Duration,
}

/// A Heap environment id, as the operator typed it (never blank). Heap accepts unknown ids
/// silently, so it is only ever copied, never parsed or trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppId(String);

impl AppId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AppId {
    type Error = &'static str;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        if id.trim().is_empty() {
            return Err("is required: set your Heap environment id (RELAY_HEAP__APP_ID)");
        }
        Ok(Self(id))
    }
}

impl From<AppId> for String {
    fn from(id: AppId) -> String {
        id.0
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
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
    #[serde(rename = "dedup_window_secs", with = "secs")]
    pub dedup_window: Duration,
    #[serde(rename = "dead_letter_retention_secs", with = "secs")]
    pub dead_letter_retention: Duration,
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

/// `[telemetry]`: trace export (contract §8, [`crate::traces`]), off while `otlp_endpoint` is
/// empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP receiver's base URL; spans are posted to `{otlp_endpoint}/v1/traces`.
    #[serde(with = "optional_http_url")]
    pub otlp_endpoint: Option<Url>,
    #[serde(deserialize_with = "not_blank")]
    pub service_name: String,
}

/// A string with something in it.
fn not_blank<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Err(serde::de::Error::custom("must not be blank"));
    }
    Ok(text)
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

/// Problems found while deserializing start with one of these words; [`describe`] then puts
/// the key first, as validation's messages read.
const PROBLEM_STARTS: [&str; 2] = ["must ", "is "];

/// A non-zero integer, refused with a message naming the rule (serde's own names the type).
fn non_zero<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<NonZeroU64>,
{
    let value = u64::deserialize(deserializer)?;
    let Some(value) = NonZeroU64::new(value) else {
        return Err(serde::de::Error::custom("must be above 0"));
    };
    T::try_from(value).map_err(|_| serde::de::Error::custom("must be a smaller number"))
}

/// A `Duration` written as whole milliseconds (`*_ms` keys).
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

/// As [`millis`], refusing 0.
mod non_zero_millis {
    use std::time::Duration;

    use serde::Deserializer;

    pub use super::millis::serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let millis: std::num::NonZeroU64 = super::non_zero(deserializer)?;
        Ok(Duration::from_millis(millis.get()))
    }
}

/// A `Duration` written as whole seconds (`*_secs` keys).
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_secs)
    }
}

/// An http(s) URL. Printed without the trailing `/` the parser adds to a bare host, so
/// `check-config` shows what was written.
mod http_url {
    use reqwest::Url;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Url, serializer: S) -> Result<S::Ok, S::Error> {
        let text = value.as_str();
        serializer.serialize_str(if value.path() == "/" {
            text.trim_end_matches('/')
        } else {
            text
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Url, D::Error> {
        let text = String::deserialize(deserializer)?;
        match Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
            _ => Err(serde::de::Error::custom("must be an http(s) URL")),
        }
    }
}

/// As [`http_url`], with `""` for none.
mod optional_http_url {
    use reqwest::Url;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Url>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(url) => super::http_url::serialize(url, serializer),
            None => serializer.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Url>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(None);
        }
        match Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(Some(url)),
            _ => Err(serde::de::Error::custom("must be an http(s) URL or empty")),
        }
    }
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
        if self.heap.identity.trim().is_empty() {
            return Err(invalid(
                "heap.identity",
                "must name `user_id` or a user property",
            ));
        }
        if self.heap.batch_max_events.get() > MAX_BATCH_EVENTS {
            return Err(invalid(
                "heap.batch_max_events",
                format!("must be between 1 and {MAX_BATCH_EVENTS}"),
            ));
        }
        if self.retry.max_backoff < self.retry.initial_backoff {
            return Err(invalid(
                "retry.max_backoff_ms",
                "must be at least retry.initial_backoff_ms",
            ));
        }
        if self.queue.dedup_window < self.userpilot.tolerance {
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
    if let Some((problem, _)) = text.split_once(" for key `")
        && PROBLEM_STARTS
            .iter()
            .any(|start| problem.starts_with(start))
    {
        return format!("`{key}` {problem}");
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
        let err = Settings::from_toml("").unwrap_err().to_string();
        assert!(err.contains("`heap.app_id` is required"), "{err}");
        let err = Settings::from_toml("[heap]\napp_id = \"1\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`userpilot.secrets` is required"), "{err}");
        let settings =
            Settings::from_toml("[heap]\napp_id = \"1\"\n[userpilot]\nsecrets = [\"s\"]").unwrap();
        assert_eq!(settings.heap.app_id.to_string(), "1");
    }

    #[test]
    fn values_are_parsed_into_their_types_and_printed_back_in_their_units() {
        let settings = Settings::from_toml(
            "[heap]\napp_id = \"0123\"\nbase_url = \"http://heap.test:81\"\ntimeout_ms = 2500\n\
             [userpilot]\nsecrets = [\"s\"]\ntolerance_secs = 90\n[queue]\ndedup_window_secs = 90",
        )
        .unwrap();
        assert_eq!(settings.heap.timeout, Duration::from_millis(2500));
        assert_eq!(settings.userpilot.tolerance, Duration::from_secs(90));
        assert_eq!(settings.heap.base_url.host_str(), Some("heap.test"));
        assert_eq!(settings.heap.app_id.as_str(), "0123");
        let printed: toml::Table = settings.to_redacted_toml().parse().unwrap();
        assert_eq!(printed["heap"]["timeout_ms"].as_integer(), Some(2500));
        assert_eq!(
            printed["heap"]["base_url"].as_str(),
            Some("http://heap.test:81")
        );
        assert_eq!(printed["heap"]["app_id"].as_str(), Some("0123"));
        assert_eq!(
            printed["userpilot"]["tolerance_secs"].as_integer(),
            Some(90)
        );
        assert_eq!(
            printed["server"]["shutdown_grace_ms"].as_integer(),
            Some(10_000)
        );
    }

    #[test]
    fn zero_where_zero_means_nothing_is_refused_naming_the_key() {
        for key in [
            "heap.timeout_ms",
            "heap.events_per_minute",
            "heap.identity_events_per_minute",
            "heap.batch_max_events",
            "server.max_body_bytes",
            "retry.initial_backoff_ms",
        ] {
            let (section, name) = key.split_once('.').unwrap();
            let toml = if section == "heap" {
                format!("[heap]\napp_id = \"1\"\n{name} = 0\n[userpilot]\nsecrets = [\"s\"]")
            } else {
                format!(
                    "[heap]\napp_id = \"1\"\n[userpilot]\nsecrets = [\"s\"]\n[{section}]\n{name} = 0"
                )
            };
            let err = Settings::from_toml(&toml).unwrap_err().to_string();
            assert_eq!(err, format!("configuration: `{key}` must be above 0"));
        }
    }
}
