//! Configuration (contract §5): the embedded `config/default.toml`, an optional `--config` file,
//! then `RELAY_<SECTION>__<KEY>` environment variables, later layers winning. Loaded and
//! validated once at startup into [`Settings`]; a bad value stops startup with one line naming
//! the key. Secrets are [`Secret`]s, so printing the settings never shows them.
//!
//! Values are parsed into the types the rest of the relay uses — `Duration`s (the keys keep
//! their `_ms` / `_secs` names and units, and `check-config` prints them back in those units),
//! non-zero integers where 0 means nothing, a [`Url`] and an [`AppId`] — so nothing downstream
//! converts or re-checks them.
//!
//! Rooms: this module holds the settings' types and the loading; `sources` the sources
//! (contract §9: `[sources.<name>]` and the top-level `default`), their checks, their resolved
//! view and what a reload changes; `forms` the written forms of values (durations, non-zero
//! numbers, URLs, lists), `checks` the values an operator likely did not mean (placeholders, a
//! silencing log filter), and `describe` the one-line messages and the repairs that let every
//! problem of a configuration be reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

use config::builder::DefaultState;
use config::{Config, ConfigBuilder, Environment, File, FileFormat, Source, Value, ValueKind};
use serde::{Deserialize, Serialize};

use crate::heap::mapping::MappingSettings;
use crate::secret::Secret;
pub use checks::{MIN_SECRET_CHARS, is_placeholder};
use checks::{log_filter_problem, postgres_url_is_placeholder, tidy_filter};
use describe::{MAX_PROBLEMS, describe};
pub use sources::{DEFAULT_SOURCE, RawSource, ReloadChanges, SourceName, SourceSettings};

mod checks;
mod describe;
mod forms;
mod sources;

/// The defaults, built into the binary so it runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers cannot be read at all (a missing file, a file that is not TOML).
    #[error("configuration: {0}")]
    Load(String),
    /// Everything wrong with the configuration, one problem a line.
    #[error("{}", lines(.0))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// The problems, each naming its key (`Load` has one).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Load(problem) => vec![problem.clone()],
            ConfigError::Invalid(problems) => problems.clone(),
        }
    }
}

fn lines(problems: &[String]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("configuration: {p}"))
        .collect();
    lines.join("\n")
}

/// One problem: "`key` problem".
fn problem(key: &str, text: impl fmt::Display) -> String {
    format!("`{key}` {text}")
}

fn invalid(key: &'static str, text: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(vec![problem(key, text.into())])
}

/// Something in a valid configuration that is probably a mistake but may be deliberate:
/// `check-config` prints it and the relay logs it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The key, dotted (`sources.staging.secrets`).
    pub key: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration: `{}` {}", self.key, self.message)
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
    pub capture: CaptureSettings,
    #[serde(default)]
    pub mapping: RawMapping,
    /// `[sources.<name>]` as written, by name (not yet checked: see [`Settings::sources`]).
    #[serde(default)]
    pub sources: BTreeMap<String, RawSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(deserialize_with = "forms::non_zero")]
    pub max_body_bytes: NonZeroUsize,
    #[serde(rename = "shutdown_grace_ms", with = "forms::millis")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserpilotSettings {
    /// The `default` source's secrets; empty: no `default` source (when `[sources]` has one).
    #[serde(deserialize_with = "forms::comma_list")]
    pub secrets: Vec<Secret>,
    #[serde(rename = "tolerance_secs", with = "forms::secs")]
    pub tolerance: Duration,
    /// The `default` source's transform (contract §10), a jq program; `[sources.<name>]`
    /// tables have their own `transform`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapSettings {
    /// The `default` source's app id; blank is unset (no `default` source).
    #[serde(with = "forms::optional_app_id")]
    pub app_id: Option<AppId>,
    #[serde(with = "forms::http_url")]
    pub base_url: Url,
    pub identity: String,
    /// At most [`MAX_BATCH_EVENTS`].
    #[serde(deserialize_with = "forms::non_zero")]
    pub batch_max_events: NonZeroU32,
    #[serde(rename = "batch_linger_ms", with = "forms::millis")]
    pub batch_linger: Duration,
    #[serde(rename = "timeout_ms", with = "forms::non_zero_millis")]
    pub timeout: Duration,
    #[serde(deserialize_with = "forms::non_zero")]
    pub events_per_minute: NonZeroU32,
    #[serde(deserialize_with = "forms::non_zero")]
    pub identity_events_per_minute: NonZeroU32,
    pub user_properties: bool,
    pub account_properties: bool,
    /// The `default` source's Heap API key (contract §12): with it, an erasure also asks
    /// Heap to delete the user. Empty: erasures of `default` are local only.
    pub api_key: Secret,
}

/// The most events Heap takes in one bulk request.
pub const MAX_BATCH_EVENTS: u32 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(rename = "initial_backoff_ms", with = "forms::non_zero_millis")]
    pub initial_backoff: Duration,
    #[serde(rename = "max_backoff_ms", with = "forms::millis")]
    pub max_backoff: Duration,
    #[serde(rename = "max_event_age_secs", with = "forms::secs")]
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
            return Err("is required: set the Heap environment id");
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
    #[serde(rename = "dedup_window_secs", with = "forms::secs")]
    pub dedup_window: Duration,
    #[serde(rename = "dead_letter_retention_secs", with = "forms::secs")]
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
    #[serde(with = "forms::optional_http_url")]
    pub otlp_endpoint: Option<Url>,
    #[serde(deserialize_with = "forms::not_blank")]
    pub service_name: String,
}

/// `[capture]`: what the relay records of the payloads it receives (contract §10.4,
/// [`crate::shapes`]). Read at start: a reload does not change it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSettings {
    pub samples: crate::shapes::Samples,
    /// Shapes stored per source, at least 1.
    #[serde(deserialize_with = "forms::non_zero")]
    pub max_shapes_per_source: NonZeroUsize,
}

/// `[mapping]` as written: `rename` is a table in files, and a `Old=New;Other=New` string in
/// the environment, where table keys with spaces and parentheses cannot be spelled.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    #[serde(default)]
    pub rename: Renames,
    #[serde(default, deserialize_with = "forms::comma_list")]
    pub drop: Vec<String>,
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
        Self::from_layers(layers(file)?)
    }

    /// The defaults with `overrides` (TOML) on top, no environment: for tests and tools.
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        Self::from_layers(defaults().add_source(File::from_str(overrides, FileFormat::Toml)))
    }

    fn from_layers(layers: ConfigBuilder<DefaultState>) -> Result<Self, ConfigError> {
        let load = |e: config::ConfigError| ConfigError::Load(describe(&e).0);
        let mut tree = layers.build().and_then(|c| c.collect()).map_err(load)?;
        let defaults = defaults().build().and_then(|c| c.collect()).map_err(load)?;
        // Serde stops at the first value it cannot take. To report every problem at once, the
        // offending key is repaired (an unknown key removed, a bad value set back to its
        // default) and the whole is read again; the configuration is refused all the same.
        let mut problems = Vec::new();
        let mut reset = std::collections::BTreeSet::new();
        let settings = loop {
            let whole = Value::new(None, ValueKind::Table(tree.clone()));
            match whole.try_deserialize::<Settings>() {
                Ok(settings) => break Some(settings),
                Err(error) => {
                    let (text, repair) = describe(&error);
                    // A required key refused again after its reset says the same thing.
                    if !problems.contains(&text) {
                        problems.push(text);
                    }
                    let repaired = problems.len() < MAX_PROBLEMS
                        && repair.apply(&mut tree, &defaults, &mut reset);
                    if !repaired {
                        break None;
                    }
                }
            }
        };
        // A missing source reads as the loader's own "is required" lines, so it is sorted with
        // them. The loader's tables are unordered, so serde meets the keys in any order:
        // sorted, the same configuration always reads the same.
        if let Some(settings) = &settings {
            problems.extend(settings.required_problems());
        }
        problems.sort();
        if let Some(settings) = &settings {
            problems.extend(settings.problems());
        }
        match settings {
            Some(mut settings) if problems.is_empty() => {
                settings.log.level = tidy_filter(&settings.log.level);
                Ok(settings)
            }
            _ => Err(ConfigError::Invalid(problems)),
        }
    }

    /// Only `server.listen` from the layers, for `healthcheck`: the rest of the configuration
    /// (secrets, app id) need not be there, nor valid.
    pub fn listen_address(file: Option<&Path>) -> Result<SocketAddr, ConfigError> {
        let config = layers(file)?
            .build()
            .map_err(|e| ConfigError::Load(describe(&e).0))?;
        config
            .get::<SocketAddr>("server.listen")
            .map_err(|e| ConfigError::Invalid(vec![describe(&e).0]))
    }

    /// Everything wrong with these (deserialized) settings, one line each.
    fn problems(&self) -> Vec<String> {
        let mut problems = self.source_problems();
        let mut refuse = |key: &str, text: &str| problems.push(problem(key, text));
        let token = self.admin.token.expose();
        if is_placeholder(token) {
            refuse(
                "admin.token",
                "is a placeholder, not a token: set a random one (openssl rand -hex 32), or \
                 leave it empty to turn /admin off",
            );
        } else if !token.is_empty() && token.chars().count() < MIN_SECRET_CHARS {
            refuse(
                "admin.token",
                &format!(
                    "is shorter than {MIN_SECRET_CHARS} characters: set a random one \
                     (openssl rand -hex 32), or leave it empty to turn /admin off"
                ),
            );
        }
        if self.heap.identity.trim().is_empty() {
            refuse("heap.identity", "must name `user_id` or a user property");
        }
        if self.heap.batch_max_events.get() > MAX_BATCH_EVENTS {
            refuse(
                "heap.batch_max_events",
                &format!("must be between 1 and {MAX_BATCH_EVENTS}"),
            );
        }
        if self.retry.max_backoff < self.retry.initial_backoff {
            refuse(
                "retry.max_backoff_ms",
                "must be at least retry.initial_backoff_ms",
            );
        }
        if self.queue.dedup_window < self.userpilot.tolerance {
            // A replayed webhook is recognised only while its first delivery is remembered;
            // within the tolerance an attacker could otherwise replay a captured request.
            refuse(
                "queue.dedup_window_secs",
                "must be at least userpilot.tolerance_secs",
            );
        }
        match self.queue.backend {
            Backend::Sqlite if self.queue.path.as_os_str().is_empty() => {
                refuse("queue.path", "is required for the sqlite backend");
            }
            Backend::Postgres if self.queue.postgres_url.is_empty() => {
                refuse("queue.postgres_url", "is required for the postgres backend");
            }
            Backend::Postgres if postgres_url_is_placeholder(self.queue.postgres_url.expose()) => {
                refuse(
                    "queue.postgres_url",
                    "holds a placeholder (the URL or its password): set the real connection URL",
                );
            }
            _ => {}
        }
        if let Some(text) = log_filter_problem(&self.log.level) {
            refuse("log.level", &text);
        }
        if let Err(error) = self.mapping() {
            problems.extend(error.problems());
        }
        problems
    }

    /// What looks wrong in these settings but does not stop the relay (contract §5.2).
    pub fn warnings(&self) -> Vec<Warning> {
        self.source_warnings()
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

/// The defaults, the `--config` file if any, then the environment.
fn layers(file: Option<&Path>) -> Result<ConfigBuilder<DefaultState>, ConfigError> {
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
    Ok(layers.add_source(environment()))
}

/// The environment layer: `RELAY_<SECTION>__<KEY>`, lower-cased by the `config` crate
/// (`RELAY_SOURCES__STAGING__APP_ID` is `sources.staging.app_id`).
fn environment() -> Environment {
    Environment::with_prefix("RELAY")
        .prefix_separator("_")
        .separator("__")
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
        assert_eq!(settings.heap.app_id.as_ref().unwrap().to_string(), "1");
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
        assert_eq!(settings.heap.app_id.as_ref().unwrap().as_str(), "0123");
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
    fn obvious_placeholders_are_recognised_and_real_values_are_not() {
        for placeholder in [
            "REPLACE_ME",
            "REPLACE_WITH_YOUR_SECRET",
            "replace-me",
            " changeme ",
            "CHANGE_ME",
            "<secret>",
            "<your admin token>",
            "${USERPILOT_SECRET}",
            "xxx",
            "XXXXXXXXXXXXXXXXXXXX",
            "secret",
            "Secret",
            "TODO",
            "password",
            "your-webhook-secret",
            "YOUR_TOKEN",
        ] {
            assert!(is_placeholder(placeholder), "{placeholder:?}");
        }
        for real in [
            "3f9c2a7be41d8c05",
            "my-secret-token-2024",
            "xx",
            "x1xxxxxx",
            "replacement-key-77",
            "todo-list-webhook-key",
            "secrets",
            "0123",
            "<not closed",
        ] {
            assert!(!is_placeholder(real), "{real:?}");
        }
    }

    #[test]
    fn log_filters_operators_write_are_accepted_and_bare_unknown_words_are_not() {
        for filter in [
            "info",
            "INFO",
            "debug,hyper=warn",
            "userpilot_heap_relay=debug",
            "userpilot_heap_relay=debug,info",
            "warn, userpilot_heap_relay::forwarder=trace",
            "off",
            "info,[webhook]=debug",
        ] {
            assert_eq!(log_filter_problem(filter), None, "{filter:?}");
        }
        let levels = "use one of trace, debug, info, warn, error or off";
        assert_eq!(
            log_filter_problem("verbose"),
            Some(format!(
                "has `verbose`, which is not a level: {levels}, optionally with targets \
                 (`info,hyper=warn`, `userpilot_heap_relay=debug`)"
            ))
        );
        assert!(
            log_filter_problem("info,loud")
                .unwrap()
                .starts_with("has `loud`, which is not a level"),
        );
        assert_eq!(log_filter_problem(" "), Some(format!("is empty: {levels}")));
        assert!(
            log_filter_problem("info,hyper=verbose")
                .unwrap()
                .starts_with("is not a valid filter"),
        );
        assert_eq!(
            log_filter_problem("hyper=warn"),
            Some(
                "`hyper=warn` sets no level for the relay's own lines, so it would hide them \
                 all: add one (`info,hyper=warn`)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn every_problem_of_a_configuration_is_reported_at_once() {
        let err = Settings::from_toml(
            "[userpilot]\nsecrets = [\"REPLACE_ME\"]\n[admin]\ntoken = \"short\"\n\
             [log]\nlevel = \"verbose\"\nformat = \"xml\"\n[heap]\nappid = \"1\"\n\
             timeout_ms = \"soon\"\n[nope]\nx = 1",
        )
        .unwrap_err();
        let problems = err.problems();
        let keys: Vec<&str> = problems
            .iter()
            .map(|p| p.split('`').nth(1).unwrap_or(p))
            .collect();
        assert_eq!(
            keys,
            [
                "heap.app_id",
                "heap.timeout_ms",
                "log.format",
                "heap.appid",
                "nope",
                "userpilot.secrets",
                "admin.token",
                "log.level",
            ],
            "{problems:#?}"
        );
        assert_eq!(err.to_string().lines().count(), problems.len());
        assert!(
            err.to_string()
                .lines()
                .all(|line| line.starts_with("configuration: "))
        );
    }

    #[test]
    fn suspicious_values_are_warnings_not_refusals() {
        let settings = Settings::from_toml(
            "[heap]\napp_id = \"prod-app\"\n[userpilot]\nsecrets = [\"short\", \
             \"a-long-enough-secret\"]",
        )
        .unwrap();
        let warnings: Vec<String> = settings.warnings().iter().map(|w| w.to_string()).collect();
        assert_eq!(
            warnings,
            [
                "configuration: `userpilot.secrets` secret 1 of 2 is shorter than 16 characters: \
                 choose a longer one in Userpilot at the next rotation",
                "configuration: `heap.app_id` `prod-app` is not decimal digits, as Heap \
                 environment ids are: Heap accepts an unknown id silently, so check it in Heap",
            ]
        );
        let settings = Settings::from_toml(
            "[heap]\napp_id = \"0123\"\n[userpilot]\nsecrets = [\"a-long-enough-secret\"]",
        )
        .unwrap();
        assert!(settings.warnings().is_empty());
    }

    #[test]
    fn a_placeholder_password_in_the_postgres_url_is_refused() {
        let base = "[heap]\napp_id = \"1\"\n[userpilot]\nsecrets = [\"s\"]\n[queue]\n\
                    backend = \"postgres\"\npostgres_url = ";
        for url in [
            "\"postgres://relay:REPLACE_ME@db/relay\"",
            "\"postgres://relay:<password>@db/relay\"",
            "\"<postgres url>\"",
        ] {
            let err = Settings::from_toml(&format!("{base}{url}")).unwrap_err();
            assert_eq!(
                err.to_string(),
                "configuration: `queue.postgres_url` holds a placeholder (the URL or its \
                 password): set the real connection URL",
                "{url}"
            );
        }
        assert!(
            Settings::from_toml(&format!("{base}\"postgres://relay:s3cr3t@db/relay\"")).is_ok()
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
