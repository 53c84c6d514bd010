//! Sources (contract §9): one Userpilot webhook delivering to one Heap app id. They are written
//! as `[sources.<name>]` tables (`RELAY_SOURCES__<NAME>__<KEY>` in the environment), and the
//! top-level `userpilot.secrets` + `heap.app_id`, when set, are the source `default`, so a
//! deployment configured before sources existed keeps working unchanged.
//!
//! This module owns the source tables as written ([`RawSource`]), their checks (one line
//! naming the key each), the resolved view the rest of the relay uses ([`SourceSettings`],
//! defaults filled in) and what a reload changes ([`ReloadChanges`]). It never prints a secret:
//! secrets are compared by value only to tell that they changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::{MIN_SECRET_CHARS, is_placeholder};
use super::{AppId, Settings, Warning, forms, problem};
use crate::secret::Secret;

/// The source the top-level `userpilot.secrets` and `heap.app_id` define, served at
/// `/webhooks/userpilot` as well as `/webhooks/userpilot/default`.
pub const DEFAULT_SOURCE: &str = "default";

/// The longest source name: it is a URL segment, a metric label and a queue column.
const MAX_NAME_CHARS: usize = 32;

/// The webhook path every source is served under.
const WEBHOOK_PATH: &str = "/webhooks/userpilot";

/// A source's name, `^[a-z0-9][a-z0-9_]{0,31}$`: safe in a URL path, a metric label and an
/// environment variable name (which the `config` crate lower-cases, hence no upper case).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceName(String);

impl SourceName {
    /// The name, if it is a valid one.
    pub fn parse(name: &str) -> Option<Self> {
        let mut chars = name.chars();
        let first = chars.next()?;
        let valid = (first.is_ascii_lowercase() || first.is_ascii_digit())
            && name.len() <= MAX_NAME_CHARS
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        valid.then(|| Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[sources.<name>]` as written. Every key is optional here so that a missing one is refused
/// by [`Settings::source_problems`] with a line naming it, not by serde.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(default, deserialize_with = "forms::comma_list")]
    pub secrets: Vec<Secret>,
    /// Blank: missing (refused).
    #[serde(default)]
    pub app_id: String,
    /// Default: `userpilot.tolerance_secs`.
    #[serde(
        default,
        rename = "tolerance_secs",
        with = "forms::optional_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub tolerance: Option<Duration>,
    /// Default: `heap.identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// A jq program run on each verified payload before decoding (contract §10). Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
    /// Heap's API key for its app id (contract §12): erasures of the source also delete the
    /// user in Heap. Default (or empty): none, erasures are local only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
}

/// One source, resolved: its defaults filled in from `userpilot.tolerance_secs` and
/// `heap.identity`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSettings {
    pub name: SourceName,
    pub secrets: Vec<Secret>,
    pub app_id: AppId,
    pub tolerance: Duration,
    pub identity: String,
    /// The jq program its payloads go through first, as written (checked to compile).
    pub transform: Option<String>,
    /// Heap's API key for its app id: with it, an erasure also deletes the user in Heap
    /// (contract §12).
    pub api_key: Option<Secret>,
}

impl SourceSettings {
    /// The URL path its webhooks are posted to: `/webhooks/userpilot/NAME`, or
    /// `/webhooks/userpilot` for `default` (which also answers at `/webhooks/userpilot/default`).
    pub fn path(&self) -> String {
        if self.name.as_str() == DEFAULT_SOURCE {
            WEBHOOK_PATH.to_owned()
        } else {
            format!("{WEBHOOK_PATH}/{}", self.name)
        }
    }
}

/// What a reload changes (contract §10): dotted keys, sorted. `applied` take effect for every
/// webhook received afterwards; `ignored` differ but need a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadChanges {
    pub applied: Vec<String>,
    pub ignored: Vec<String>,
}

impl ReloadChanges {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.ignored.is_empty()
    }
}

/// Keys a reload applies without a restart: everything that defines sources, and the mapping.
fn is_live(key: &str) -> bool {
    key.starts_with("sources.")
        || key.starts_with("mapping.")
        || matches!(
            key,
            "userpilot.secrets"
                | "userpilot.tolerance_secs"
                | "userpilot.transform"
                | "heap.app_id"
                | "heap.api_key"
                | "heap.identity"
                | "heap.user_properties"
                | "heap.account_properties"
        )
}

/// `RELAY_SOURCES__STAGING__APP_ID`, for messages.
fn env_name(name: &str, key: &str) -> String {
    format!(
        "RELAY_SOURCES__{}__{}",
        name.to_uppercase(),
        key.to_uppercase()
    )
}

/// The problems of one list of webhook secrets at `key`: none, an empty one, placeholders.
pub(super) fn secrets_problems(key: &str, env: &str, secrets: &[Secret]) -> Vec<String> {
    let mut problems = Vec::new();
    if secrets.iter().all(Secret::is_empty) {
        problems.push(problem(
            key,
            format!("is required: set at least one webhook secret ({env})"),
        ));
        return problems;
    }
    if secrets.iter().any(Secret::is_empty) {
        problems.push(problem(key, "contains an empty secret"));
    }
    for (index, secret) in secrets.iter().enumerate() {
        if is_placeholder(secret.expose()) {
            problems.push(problem(
                key,
                format!(
                    "secret {} of {} is a placeholder, not a secret: set the webhook secret \
                     token from Userpilot",
                    index + 1,
                    secrets.len()
                ),
            ));
        }
    }
    problems
}

/// An API key that is set: empty is the same as none (the form an environment file's
/// `KEY=` takes).
fn present(key: &Secret) -> Option<Secret> {
    (!key.is_empty()).then(|| key.clone())
}

/// The problem of a Heap API key at `key`: a placeholder (never shown: it is a secret).
fn api_key_problem(key: &str, env: &str, api_key: Option<&Secret>) -> Option<String> {
    api_key.filter(|k| is_placeholder(k.expose())).map(|_| {
        problem(
            key,
            format!(
                "is a placeholder, not an API key: set the Heap API key of the app id ({env}), \
                 or leave it empty for local-only erasures"
            ),
        )
    })
}

/// The problem of a transform at `key`: a program that does not compile, in one line with
/// the position (`sources.staging.transform: undefined filter `foo` at line 2, column 3`).
/// Compiled here, once per configuration: a configuration that loads has programs that do.
fn transform_problem(key: &str, code: Option<&str>) -> Option<String> {
    let code = code?;
    if code.trim().is_empty() {
        return Some(problem(
            key,
            "is empty: remove the key, or write a jq program (`.` keeps the payload)",
        ));
    }
    crate::transform::compile(code)
        .err()
        .map(|error| problem(key, format!("does not compile: {error}")))
}

/// The warnings about one list of webhook secrets at `key`: short ones.
pub(super) fn secrets_warnings(key: &str, secrets: &[Secret]) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for (index, secret) in secrets.iter().enumerate() {
        let length = secret.expose().chars().count();
        if length > 0 && length < MIN_SECRET_CHARS && !is_placeholder(secret.expose()) {
            warnings.push(Warning {
                key: key.to_owned(),
                message: format!(
                    "secret {} of {} is shorter than {MIN_SECRET_CHARS} characters: choose a \
                     longer one in Userpilot at the next rotation",
                    index + 1,
                    secrets.len()
                ),
            });
        }
    }
    warnings
}

/// The warning about an app id that is not digits, at `key`.
pub(super) fn app_id_warning(key: &str, app_id: &str) -> Option<Warning> {
    (!app_id.bytes().all(|b| b.is_ascii_digit())).then(|| Warning {
        key: key.to_owned(),
        message: format!(
            "`{app_id}` is not decimal digits, as Heap environment ids are: Heap accepts an \
             unknown id silently, so check it in Heap"
        ),
    })
}

impl Settings {
    /// Whether the top-level `userpilot.secrets` or `heap.app_id` is set (either defines the
    /// source `default`; both are then required).
    fn top_level_source_set(&self) -> bool {
        !self.userpilot.secrets.iter().all(Secret::is_empty) || self.heap.app_id.is_some()
    }

    /// Every source, sorted by name, `default` (from top-level keys) included when set.
    pub fn sources(&self) -> Vec<SourceSettings> {
        let mut sources = BTreeMap::new();
        if let Some(app_id) = &self.heap.app_id
            && !self.userpilot.secrets.iter().all(Secret::is_empty)
            && let Some(name) = SourceName::parse(DEFAULT_SOURCE)
        {
            sources.insert(
                name.clone(),
                SourceSettings {
                    name,
                    secrets: self.userpilot.secrets.clone(),
                    app_id: app_id.clone(),
                    tolerance: self.userpilot.tolerance,
                    identity: self.heap.identity.clone(),
                    transform: self.userpilot.transform.clone(),
                    api_key: present(&self.heap.api_key),
                },
            );
        }
        for (name, raw) in &self.sources {
            // Validated settings hold only sources that resolve; a hand-built one may not.
            let (Some(name), Ok(app_id)) =
                (SourceName::parse(name), AppId::try_from(raw.app_id.clone()))
            else {
                continue;
            };
            sources.entry(name.clone()).or_insert(SourceSettings {
                name,
                secrets: raw.secrets.clone(),
                app_id,
                tolerance: raw.tolerance.unwrap_or(self.userpilot.tolerance),
                identity: raw
                    .identity
                    .clone()
                    .unwrap_or_else(|| self.heap.identity.clone()),
                transform: raw.transform.clone(),
                api_key: raw.api_key.as_ref().and_then(present),
            });
        }
        sources.into_values().collect()
    }

    /// The refusals that say a source is missing or half there: no source at all, or one of
    /// the top-level pair without the other. They read as the loader's own "is required"
    /// lines, so they are sorted with those.
    pub(super) fn required_problems(&self) -> Vec<String> {
        let secrets_set = !self.userpilot.secrets.iter().all(Secret::is_empty);
        let app_id_set = self.heap.app_id.is_some();
        let mut problems = Vec::new();
        if !self.sources.is_empty() && !secrets_set && !app_id_set {
            return problems;
        }
        let why = if secrets_set || app_id_set {
            "the other top-level key is set, which makes the source `default`"
        } else {
            "no source is configured: set the top-level keys (the source `default`) or add \
             [sources.<name>] tables"
        };
        if !app_id_set {
            problems.push(problem(
                "heap.app_id",
                format!("is required: set your Heap environment id (RELAY_HEAP__APP_ID); {why}"),
            ));
        }
        if !secrets_set {
            problems.push(problem(
                "userpilot.secrets",
                format!(
                    "is required: set at least one webhook secret (RELAY_USERPILOT__SECRETS); \
                     {why}"
                ),
            ));
        }
        problems
    }

    /// Everything else wrong with the sources, one line each, naming `sources.NAME.KEY`
    /// (or the top-level key, for `default`).
    pub(super) fn source_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        problems.extend(api_key_problem(
            "heap.api_key",
            "RELAY_HEAP__API_KEY",
            Some(&self.heap.api_key),
        ));
        if self.top_level_source_set() {
            let secrets = &self.userpilot.secrets;
            if !secrets.iter().all(Secret::is_empty) {
                problems.extend(secrets_problems(
                    "userpilot.secrets",
                    "RELAY_USERPILOT__SECRETS",
                    secrets,
                ));
            }
            if let Some(app_id) = &self.heap.app_id
                && is_placeholder(app_id.as_str())
            {
                problems.push(problem(
                    "heap.app_id",
                    "is a placeholder: set your Heap environment id (RELAY_HEAP__APP_ID)",
                ));
            }
            problems.extend(transform_problem(
                "userpilot.transform",
                self.userpilot.transform.as_deref(),
            ));
            if self.sources.contains_key(DEFAULT_SOURCE) {
                problems.push(problem(
                    "sources.default",
                    "duplicates the source `default` that the top-level userpilot.secrets and \
                     heap.app_id define: keep one of the two",
                ));
            }
        }
        for (name, raw) in &self.sources {
            let key = |k: &str| format!("sources.{name}.{k}");
            if SourceName::parse(name).is_none() {
                problems.push(problem(
                    &format!("sources.{name}"),
                    format!(
                        "is not a valid source name: use 1 to {MAX_NAME_CHARS} lower-case \
                         letters, digits and `_`, starting with a letter or a digit"
                    ),
                ));
            }
            problems.extend(secrets_problems(
                &key("secrets"),
                &env_name(name, "secrets"),
                &raw.secrets,
            ));
            let env = env_name(name, "app_id");
            if raw.app_id.trim().is_empty() {
                problems.push(problem(
                    &key("app_id"),
                    format!("is required: set the source's Heap environment id ({env})"),
                ));
            } else if is_placeholder(&raw.app_id) {
                problems.push(problem(
                    &key("app_id"),
                    format!("is a placeholder: set the source's Heap environment id ({env})"),
                ));
            }
            if raw.identity.as_ref().is_some_and(|i| i.trim().is_empty()) {
                problems.push(problem(
                    &key("identity"),
                    "must name `user_id` or a user property",
                ));
            }
            problems.extend(transform_problem(
                &key("transform"),
                raw.transform.as_deref(),
            ));
            problems.extend(api_key_problem(
                &key("api_key"),
                &env_name(name, "api_key"),
                raw.api_key.as_ref(),
            ));
            if raw.tolerance.is_some_and(|t| t > self.queue.dedup_window) {
                // As for userpilot.tolerance_secs: a replay inside the tolerance must still be
                // remembered.
                problems.push(problem(
                    "queue.dedup_window_secs",
                    format!("must be at least {}", key("tolerance_secs")),
                ));
            }
        }
        problems
    }

    /// The warnings about the sources (short secrets, an app id that is not digits).
    pub(super) fn source_warnings(&self) -> Vec<Warning> {
        let mut warnings = secrets_warnings("userpilot.secrets", &self.userpilot.secrets);
        if let Some(app_id) = &self.heap.app_id {
            warnings.extend(app_id_warning("heap.app_id", app_id.as_str()));
        }
        if !self.heap.api_key.is_empty() && !self.top_level_source_set() {
            warnings.push(Warning {
                key: "heap.api_key".to_owned(),
                message: "is the API key of the source `default`, which is not configured: \
                          it is not used (a [sources.<name>] table takes its own api_key)"
                    .to_owned(),
            });
        }
        for (name, raw) in &self.sources {
            warnings.extend(secrets_warnings(
                &format!("sources.{name}.secrets"),
                &raw.secrets,
            ));
            if !raw.app_id.trim().is_empty() {
                warnings.extend(app_id_warning(
                    &format!("sources.{name}.app_id"),
                    &raw.app_id,
                ));
            }
        }
        warnings
    }

    /// What a reload from `self` to `new` changes: keys applied live, and keys that differ but
    /// need a restart (reported as ignored). Dotted key paths, sorted, e.g.
    /// "sources.staging.secrets", "sources.qa" (added/removed source), "mapping.rename",
    /// "heap.identity", "userpilot.secrets"; ignored: "server.listen", "queue.path", ...
    pub fn reload_changes(&self, new: &Settings) -> ReloadChanges {
        let old_keys = flatten(self);
        let new_keys = flatten(new);
        let mut changed: BTreeSet<String> = old_keys
            .keys()
            .chain(new_keys.keys())
            .filter(|key| old_keys.get(*key) != new_keys.get(*key))
            .cloned()
            .collect();
        // Secrets print redacted, so their printed forms may agree while the values differ.
        let mut secret_differs = |key: String, differs: bool| {
            if differs {
                changed.insert(key);
            }
        };
        secret_differs(
            "userpilot.secrets".into(),
            self.userpilot.secrets != new.userpilot.secrets,
        );
        secret_differs("admin.token".into(), self.admin.token != new.admin.token);
        secret_differs("heap.api_key".into(), self.heap.api_key != new.heap.api_key);
        secret_differs(
            "queue.postgres_url".into(),
            self.queue.postgres_url != new.queue.postgres_url,
        );
        for (name, old) in &self.sources {
            if let Some(fresh) = new.sources.get(name) {
                secret_differs(
                    format!("sources.{name}.secrets"),
                    old.secrets != fresh.secrets,
                );
                secret_differs(
                    format!("sources.{name}.api_key"),
                    old.api_key != fresh.api_key,
                );
            }
        }
        // The mapping compared as parsed: a table and its inline form are the same renames.
        if let (Ok(old), Ok(fresh)) = (self.mapping(), new.mapping())
            && old.rename == fresh.rename
        {
            changed.remove("mapping.rename");
        }
        // A source added or removed is one key, not one per key of its table.
        let added_or_removed: BTreeSet<&String> = self
            .sources
            .keys()
            .filter(|name| !new.sources.contains_key(*name))
            .chain(
                new.sources
                    .keys()
                    .filter(|name| !self.sources.contains_key(*name)),
            )
            .collect();
        changed.retain(|key| {
            let inside = key
                .strip_prefix("sources.")
                .and_then(|rest| rest.split_once('.'))
                .map(|(name, _)| name.to_owned());
            !inside.is_some_and(|name| added_or_removed.contains(&name))
        });
        let (applied, ignored) = changed.into_iter().partition(|key| is_live(key));
        ReloadChanges { applied, ignored }
    }
}

/// The settings as dotted keys and their printed values: `section.key`, and for sources
/// `sources.NAME` (the whole source, when only one side has it) or `sources.NAME.KEY`.
fn flatten(settings: &Settings) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let Ok(toml::Value::Table(sections)) = toml::Value::try_from(settings) else {
        return keys;
    };
    for (section, value) in sections {
        let toml::Value::Table(table) = value else {
            keys.insert(section, value.to_string());
            continue;
        };
        for (key, value) in table {
            match value {
                toml::Value::Table(source) if section == "sources" => {
                    for (field, value) in source {
                        keys.insert(format!("sources.{key}.{field}"), value.to_string());
                    }
                    // A source as a whole, so that one added or removed is one key.
                    keys.insert(format!("sources.{key}"), String::new());
                }
                value => {
                    keys.insert(format!("{section}.{key}"), value.to_string());
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use config::{File, FileFormat};

    use super::*;
    use crate::config::{ConfigError, defaults, environment};

    const SECRET: &str = "a-long-enough-secret";

    /// The defaults, `toml` on top, then `env` as if it were the process environment.
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_layers(
            defaults()
                .add_source(File::from_str(toml, FileFormat::Toml))
                .add_source(environment().source(Some(env))),
        )
    }

    fn settings(toml: &str) -> Settings {
        load(toml, &[]).unwrap_or_else(|e| panic!("{e}\n{toml}"))
    }

    fn problems(toml: &str) -> Vec<String> {
        match load(toml, &[]) {
            Ok(_) => panic!("accepted:\n{toml}"),
            Err(error) => error.problems(),
        }
    }

    fn names(sources: &[SourceSettings]) -> Vec<&str> {
        sources.iter().map(|s| s.name.as_str()).collect()
    }

    const TOP: &str =
        "[heap]\napp_id = \"100\"\n[userpilot]\nsecrets = [\"a-long-enough-secret\"]\n";

    #[test]
    fn source_names_are_lower_case_letters_digits_and_underscores_up_to_32() {
        for good in ["default", "staging", "prod_eu", "0", "1st", &"a".repeat(32)] {
            assert_eq!(
                SourceName::parse(good).map(|n| n.to_string()),
                Some(good.to_owned())
            );
        }
        for bad in [
            "",
            "Staging",
            "staging-1",
            "_staging",
            "stag ing",
            "étape",
            &"a".repeat(33),
        ] {
            assert_eq!(SourceName::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn top_level_keys_alone_are_the_default_source_as_before() {
        let settings = settings(
            "[heap]\napp_id = \"100\"\nidentity = \"email\"\n[userpilot]\n\
             secrets = [\"first-secret-token\", \"second-secret-token\"]\ntolerance_secs = 90",
        );
        let sources = settings.sources();
        assert_eq!(sources.len(), 1);
        let source = &sources[0];
        assert_eq!(source.name.as_str(), DEFAULT_SOURCE);
        assert_eq!(source.path(), "/webhooks/userpilot");
        assert_eq!(source.app_id.as_str(), "100");
        assert_eq!(source.secrets, settings.userpilot.secrets);
        assert_eq!(source.tolerance, Duration::from_secs(90));
        assert_eq!(source.identity, "email");
    }

    #[test]
    fn named_sources_take_their_defaults_from_the_top_level_and_sort_by_name() {
        let settings = settings(&format!(
            "[heap]\napp_id = \"100\"\nidentity = \"email\"\n\
             [userpilot]\nsecrets = [\"{SECRET}\"]\ntolerance_secs = 120\n\
             [sources.staging]\nsecrets = [\"staging-secret-token\"]\napp_id = \"200\"\n\
             [sources.eu]\nsecrets = [\"eu-secret-token-0001\", \"eu-secret-token-0002\"]\n\
             app_id = 300\ntolerance_secs = 60\nidentity = \"user_id\"",
        ));
        let sources = settings.sources();
        assert_eq!(names(&sources), ["default", "eu", "staging"]);
        let eu = &sources[1];
        assert_eq!(eu.path(), "/webhooks/userpilot/eu");
        assert_eq!(eu.app_id.as_str(), "300");
        assert_eq!(eu.secrets.len(), 2);
        assert_eq!(eu.secrets[1].expose(), "eu-secret-token-0002");
        assert_eq!(eu.tolerance, Duration::from_secs(60));
        assert_eq!(eu.identity, "user_id");
        let staging = &sources[2];
        assert_eq!(staging.app_id.as_str(), "200");
        assert_eq!(staging.tolerance, Duration::from_secs(120));
        assert_eq!(staging.identity, "email");
    }

    #[test]
    fn named_sources_need_no_top_level_keys() {
        let settings = settings(
            "[sources.production]\nsecrets = [\"production-secret-01\"]\napp_id = \"1\"\n\
             [sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"",
        );
        assert_eq!(names(&settings.sources()), ["production", "staging"]);
        assert_eq!(settings.heap.app_id, None);
        assert!(settings.warnings().is_empty(), "{:?}", settings.warnings());
    }

    #[test]
    fn a_sources_default_table_without_top_level_keys_is_the_default_source() {
        let settings =
            settings("[sources.default]\nsecrets = [\"a-long-enough-secret\"]\napp_id = \"7\"");
        let sources = settings.sources();
        assert_eq!(names(&sources), ["default"]);
        assert_eq!(sources[0].path(), "/webhooks/userpilot");
        assert_eq!(sources[0].app_id.as_str(), "7");
    }

    #[test]
    fn sources_come_from_environment_variables_with_a_comma_list_of_secrets() {
        let settings = load(
            "",
            &[
                (
                    "RELAY_SOURCES__STAGING__SECRETS",
                    "staging-secret-one,staging-secret-two",
                ),
                ("RELAY_SOURCES__STAGING__APP_ID", "0123"),
                ("RELAY_SOURCES__STAGING__TOLERANCE_SECS", "60"),
                ("RELAY_SOURCES__PROD_EU__SECRETS", "prod-eu-secret-token"),
                ("RELAY_SOURCES__PROD_EU__APP_ID", "456"),
                ("RELAY_SOURCES__PROD_EU__IDENTITY", "email"),
            ],
        )
        .unwrap();
        let sources = settings.sources();
        assert_eq!(names(&sources), ["prod_eu", "staging"]);
        let staging = &sources[1];
        let secrets: Vec<&str> = staging.secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["staging-secret-one", "staging-secret-two"]);
        // Kept as typed: not parsed as the number 123.
        assert_eq!(staging.app_id.as_str(), "0123");
        assert_eq!(staging.tolerance, Duration::from_secs(60));
        assert_eq!(staging.identity, "user_id");
        assert_eq!(sources[0].identity, "email");
        assert_eq!(sources[0].app_id.as_str(), "456");
    }

    #[test]
    fn the_environment_adds_to_and_overrides_a_file_source() {
        let settings = load(
            "[sources.staging]\nsecrets = [\"from-the-file-0001\"]\napp_id = \"1\"",
            &[
                ("RELAY_SOURCES__STAGING__SECRETS", "from-the-environment"),
                ("RELAY_HEAP__APP_ID", "9"),
                ("RELAY_USERPILOT__SECRETS", SECRET),
            ],
        )
        .unwrap();
        let sources = settings.sources();
        assert_eq!(names(&sources), ["default", "staging"]);
        assert_eq!(sources[1].secrets[0].expose(), "from-the-environment");
        assert_eq!(sources[1].app_id.as_str(), "1");
    }

    #[test]
    fn no_source_at_all_is_refused_by_both_required_keys_pointing_at_sources() {
        let problems = problems("");
        assert_eq!(
            problems,
            [
                "`heap.app_id` is required: set your Heap environment id (RELAY_HEAP__APP_ID); \
                 no source is configured: set the top-level keys (the source `default`) or add \
                 [sources.<name>] tables",
                "`userpilot.secrets` is required: set at least one webhook secret \
                 (RELAY_USERPILOT__SECRETS); no source is configured: set the top-level keys \
                 (the source `default`) or add [sources.<name>] tables",
            ]
        );
        // An empty `[sources]` is no source either.
        assert_eq!(super::tests::problems("[sources]").len(), 2);
    }

    #[test]
    fn half_a_top_level_source_is_refused_naming_the_missing_key() {
        let half = "the other top-level key is set, which makes the source `default`";
        let with_sources =
            "[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n";
        for extra in ["", with_sources] {
            assert_eq!(
                problems(&format!("{extra}[heap]\napp_id = \"1\"")),
                [format!(
                    "`userpilot.secrets` is required: set at least one webhook secret \
                     (RELAY_USERPILOT__SECRETS); {half}"
                )]
            );
            assert_eq!(
                problems(&format!("{extra}[userpilot]\nsecrets = [\"{SECRET}\"]")),
                [format!(
                    "`heap.app_id` is required: set your Heap environment id \
                     (RELAY_HEAP__APP_ID); {half}"
                )]
            );
        }
    }

    #[test]
    fn every_refused_source_is_one_line_naming_its_key() {
        let ok = "secrets = [\"staging-secret-0001\"]\napp_id = \"2\"";
        let cases: &[(String, &str)] = &[
            (
                format!("{TOP}[sources.default]\n{ok}"),
                "`sources.default` duplicates the source `default` that the top-level \
                 userpilot.secrets and heap.app_id define: keep one of the two",
            ),
            (
                format!("[sources.Staging-1]\n{ok}"),
                "`sources.Staging-1` is not a valid source name: use 1 to 32 lower-case \
                 letters, digits and `_`, starting with a letter or a digit",
            ),
            (
                format!("[sources.{}]\n{ok}", "a".repeat(33)),
                "is not a valid source name",
            ),
            (
                "[sources.staging]\napp_id = \"2\"".to_owned(),
                "`sources.staging.secrets` is required: set at least one webhook secret \
                 (RELAY_SOURCES__STAGING__SECRETS)",
            ),
            (
                "[sources.staging]\nsecrets = []\napp_id = \"2\"".to_owned(),
                "`sources.staging.secrets` is required",
            ),
            (
                "[sources.staging]\nsecrets = [\"staging-secret-0001\"]".to_owned(),
                "`sources.staging.app_id` is required: set the source's Heap environment id \
                 (RELAY_SOURCES__STAGING__APP_ID)",
            ),
            (
                "[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \" \"".to_owned(),
                "`sources.staging.app_id` is required",
            ),
            (
                "[sources.staging]\nsecrets = [\"staging-secret-0001\", \"\"]\napp_id = \"2\""
                    .to_owned(),
                "`sources.staging.secrets` contains an empty secret",
            ),
            (
                "[sources.staging]\nsecrets = [\"REPLACE_ME\"]\napp_id = \"2\"".to_owned(),
                "`sources.staging.secrets` secret 1 of 1 is a placeholder, not a secret: set \
                 the webhook secret token from Userpilot",
            ),
            (
                "[sources.staging]\nsecrets = [\"staging-secret-0001\"]\n\
                 app_id = \"<heap app id>\""
                    .to_owned(),
                "`sources.staging.app_id` is a placeholder: set the source's Heap environment \
                 id (RELAY_SOURCES__STAGING__APP_ID)",
            ),
            (
                format!("[sources.staging]\n{ok}\nidentity = \" \""),
                "`sources.staging.identity` must name `user_id` or a user property",
            ),
            (
                format!(
                    "[queue]\ndedup_window_secs = 600\n[sources.staging]\n{ok}\ntolerance_secs = 601"
                ),
                "`queue.dedup_window_secs` must be at least sources.staging.tolerance_secs",
            ),
            (
                format!("[sources.staging]\n{ok}\nwrite_key = \"k\""),
                "unknown key `sources.staging.write_key`",
            ),
            (
                format!("[sources.staging]\n{ok}\ntolerance_secs = \"soon\""),
                "`sources.staging.tolerance_secs` must be an integer",
            ),
        ];
        for (toml, expected) in cases {
            let problems = problems(toml);
            assert_eq!(problems.len(), 1, "{toml}\n{problems:#?}");
            assert!(problems[0].contains(expected), "{toml}\n{problems:#?}");
        }
    }

    #[test]
    fn a_bad_secret_value_is_named_but_never_shown() {
        let problems = problems(
            "[sources.staging]\napp_id = \"2\"\nsecrets = { hidden = \"hunter2-but-longer\" }",
        );
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert_eq!(
            problems[0],
            "`sources.staging.secrets` has an invalid value (not shown: it is a secret)"
        );
        assert!(!problems.concat().contains("hunter2"));
    }

    #[test]
    fn a_transform_that_does_not_compile_is_one_line_naming_its_key_and_position() {
        let found = problems(&format!(
            "{TOP}[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n\
             transform = \".a |\\n  foo(1)\"\n"
        ));
        assert_eq!(
            found,
            [
                "`sources.staging.transform` does not compile: undefined filter `foo` at line 2, \
              column 3"
            ],
        );
        let found = problems(&format!("{TOP}transform = \"{{a: .b\"\n"));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("`userpilot.transform` does not compile: ")
                && found[0].ends_with("at line 1, column 7"),
            "{found:#?}"
        );
        let found = problems(&format!("{TOP}transform = \" \"\n"));
        assert!(
            found[0].starts_with("`userpilot.transform` is empty"),
            "{found:#?}"
        );
    }

    #[test]
    fn each_source_has_its_transform_and_the_default_source_takes_userpilot_transform() {
        let settings = settings(&format!(
            "{TOP}transform = \"{{data: .payload}}\"\n\
             [sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n\
             transform = \".\"\n\
             [sources.qa]\nsecrets = [\"qa-secret-000000001\"]\napp_id = \"3\"\n"
        ));
        let transforms: Vec<(String, Option<String>)> = settings
            .sources()
            .into_iter()
            .map(|s| (s.name.to_string(), s.transform))
            .collect();
        assert_eq!(
            transforms,
            [
                ("default".to_owned(), Some("{data: .payload}".to_owned())),
                ("qa".to_owned(), None),
                ("staging".to_owned(), Some(".".to_owned())),
            ]
        );
    }

    #[test]
    fn every_problem_of_every_source_is_reported_at_once() {
        let problems = problems(
            "[sources.qa]\nsecrets = [\"changeme\"]\n\
             [sources.staging]\napp_id = \"2\"\ntolerance_secs = \"soon\"\nnope = \"x\"\n\
             [sources.Bad]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"3\"",
        );
        let keys: Vec<&str> = problems
            .iter()
            .map(|p| p.split('`').nth(1).unwrap_or(p))
            .collect();
        assert_eq!(
            keys,
            [
                "sources.staging.tolerance_secs",
                "sources.staging.nope",
                "sources.Bad",
                "sources.qa.secrets",
                "sources.qa.app_id",
                "sources.staging.secrets",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn short_secrets_and_odd_app_ids_are_warned_about_per_source() {
        let settings = settings(&format!(
            "{TOP}[sources.staging]\nsecrets = [\"a-long-enough-secret\", \"short\"]\n\
             app_id = \"staging-app\"\n[sources.qa]\nsecrets = [\"qa\"]\napp_id = \"3\""
        ));
        let warnings: Vec<(String, String)> = settings
            .warnings()
            .into_iter()
            .map(|w| (w.key.clone(), w.to_string()))
            .collect();
        let keys: Vec<&str> = warnings.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "sources.qa.secrets",
                "sources.staging.secrets",
                "sources.staging.app_id"
            ]
        );
        assert_eq!(
            warnings[1].1,
            "configuration: `sources.staging.secrets` secret 2 of 2 is shorter than 16 \
             characters: choose a longer one in Userpilot at the next rotation"
        );
        assert_eq!(
            warnings[2].1,
            "configuration: `sources.staging.app_id` `staging-app` is not decimal digits, as \
             Heap environment ids are: Heap accepts an unknown id silently, so check it in Heap"
        );
    }

    #[test]
    fn the_effective_toml_shows_sources_with_their_secrets_redacted() {
        let settings = settings(&format!(
            "{TOP}[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n\
             tolerance_secs = 60"
        ));
        let printed = settings.to_redacted_toml();
        assert!(!printed.contains("staging-secret-0001"), "{printed}");
        let table: toml::Table = printed.parse().unwrap();
        let staging = &table["sources"]["staging"];
        assert_eq!(staging["app_id"].as_str(), Some("2"));
        assert_eq!(staging["tolerance_secs"].as_integer(), Some(60));
        assert_eq!(staging["secrets"][0].as_str(), Some("[redacted]"));
        assert!(staging.get("identity").is_none(), "{printed}");
        // Printed back, it loads as the same configuration (secrets aside).
        let reread =
            Settings::from_toml(&printed.replace("[redacted]", "x-long-enough-secret")).unwrap();
        assert_eq!(names(&reread.sources()), ["default", "staging"]);
    }

    // --- reload ----------------------------------------------------------------------------

    const BASE: &str = "[heap]\napp_id = \"100\"\n[userpilot]\nsecrets = [\"a-long-enough-secret\"]\n\
         [sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"200\"\n\
         [mapping]\nrename = { \"Userpilot NPS\" = \"NPS\" }\n";

    fn changes(old: &str, new: &str) -> ReloadChanges {
        settings(old).reload_changes(&settings(new))
    }

    #[test]
    fn a_reload_that_changes_nothing_reports_nothing() {
        let changes = changes(BASE, BASE);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(changes, ReloadChanges::default());
    }

    #[test]
    fn a_changed_secret_is_applied_though_both_print_redacted() {
        let new = BASE.replace("staging-secret-0001", "staging-secret-0002");
        assert_eq!(
            changes(BASE, &new),
            ReloadChanges {
                applied: vec!["sources.staging.secrets".into()],
                ignored: vec![],
            }
        );
        let new = BASE.replace(
            "a-long-enough-secret",
            "another-long-secret\", \"a-long-enough-secret",
        );
        assert_eq!(changes(BASE, &new).applied, ["userpilot.secrets"]);
    }

    #[test]
    fn an_added_and_a_removed_source_are_one_key_each() {
        let new = BASE.replace("[sources.staging]", "[sources.qa]");
        assert_eq!(
            changes(BASE, &new),
            ReloadChanges {
                applied: vec!["sources.qa".into(), "sources.staging".into()],
                ignored: vec![],
            }
        );
        let new = BASE.replace(
            "app_id = \"200\"",
            "app_id = \"200\"\nidentity = \"email\"\ntolerance_secs = 60",
        );
        assert_eq!(
            changes(BASE, &new).applied,
            ["sources.staging.identity", "sources.staging.tolerance_secs"]
        );
    }

    #[test]
    fn a_mapping_change_is_applied_and_the_same_renames_inline_are_no_change() {
        let new = BASE.replace("\"NPS\"", "\"Net Promoter Score\"");
        assert_eq!(changes(BASE, &new).applied, ["mapping.rename"]);
        let inline = BASE.replace(
            "rename = { \"Userpilot NPS\" = \"NPS\" }",
            "rename = \"Userpilot NPS=NPS\"",
        );
        assert!(changes(BASE, &inline).is_empty());
        let new = format!("{BASE}drop = [\"Userpilot Feature Tag (hover)\"]");
        assert_eq!(changes(BASE, &new).applied, ["mapping.drop"]);
    }

    #[test]
    fn keys_that_need_a_restart_are_reported_as_ignored() {
        let new = format!(
            "{}[server]\nlisten = \"0.0.0.0:8181\"\n[queue]\npath = \"elsewhere.sqlite3\"\n\
             [admin]\ntoken = \"an-admin-token-of-some-length\"\n[log]\nlevel = \"debug\"",
            BASE.replace(
                "app_id = \"100\"",
                "app_id = \"100\"\nidentity = \"email\"\nevents_per_minute = 100\n\
                 user_properties = false"
            )
        );
        assert_eq!(
            changes(BASE, &new),
            ReloadChanges {
                applied: vec!["heap.identity".into(), "heap.user_properties".into()],
                ignored: vec![
                    "admin.token".into(),
                    "heap.events_per_minute".into(),
                    "log.level".into(),
                    "queue.path".into(),
                    "server.listen".into(),
                ],
            }
        );
    }

    #[test]
    fn moving_the_default_source_to_a_table_changes_its_top_level_keys() {
        let new = "[sources.default]\nsecrets = [\"a-long-enough-secret\"]\napp_id = \"100\"\n\
                   [sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"200\"\n\
                   [mapping]\nrename = { \"Userpilot NPS\" = \"NPS\" }\n";
        assert_eq!(
            changes(BASE, new).applied,
            ["heap.app_id", "sources.default", "userpilot.secrets"]
        );
    }

    // --- api keys (contract §12) ------------------------------------------------------------

    fn api_keys(settings: &Settings) -> Vec<(String, Option<String>)> {
        settings
            .sources()
            .into_iter()
            .map(|s| (s.name.to_string(), s.api_key.map(|k| k.expose().to_owned())))
            .collect()
    }

    #[test]
    fn each_source_has_its_api_key_and_the_default_source_takes_heap_api_key() {
        let settings = settings(&format!(
            "{}[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n\
             api_key = \"staging-heap-key\"\n\
             [sources.qa]\nsecrets = [\"qa-secret-000000001\"]\napp_id = \"3\"\napi_key = \"\"\n",
            TOP.replace(
                "app_id = \"100\"",
                "app_id = \"100\"\napi_key = \"default-heap-key\""
            )
        ));
        assert_eq!(
            api_keys(&settings),
            [
                ("default".to_owned(), Some("default-heap-key".to_owned())),
                // Empty is none: the form an environment file's `KEY=` takes.
                ("qa".to_owned(), None),
                ("staging".to_owned(), Some("staging-heap-key".to_owned())),
            ]
        );
        assert_eq!(api_keys(&self::settings(TOP))[0].1, None);
    }

    #[test]
    fn a_placeholder_api_key_is_refused_with_one_line_naming_the_key_but_not_the_value() {
        let found = problems(&TOP.replace(
            "app_id = \"100\"",
            "app_id = \"100\"\napi_key = \"<heap api key>\"",
        ));
        assert_eq!(
            found,
            [
                "`heap.api_key` is a placeholder, not an API key: set the Heap API key of the app \
              id (RELAY_HEAP__API_KEY), or leave it empty for local-only erasures"
            ]
        );
        let found = problems(&format!(
            "{TOP}[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n\
             api_key = \"REPLACE_ME\"\n"
        ));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("`sources.staging.api_key` is a placeholder")
                && found[0].contains("(RELAY_SOURCES__STAGING__API_KEY)")
                && !found[0].contains("REPLACE_ME"),
            "{found:#?}"
        );
    }

    #[test]
    fn api_keys_print_redacted_and_heap_api_key_without_a_default_source_is_warned_about() {
        let settings = settings(&format!(
            "{}[sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n\
             api_key = \"staging-heap-key\"\n",
            TOP.replace(
                "app_id = \"100\"",
                "app_id = \"100\"\napi_key = \"default-heap-key\""
            )
        ));
        let printed = settings.to_redacted_toml();
        assert!(!printed.contains("heap-key"), "{printed}");
        let table: toml::Table = printed.parse().unwrap();
        assert_eq!(table["heap"]["api_key"].as_str(), Some("[redacted]"));
        assert_eq!(
            table["sources"]["staging"]["api_key"].as_str(),
            Some("[redacted]")
        );
        assert!(settings.warnings().is_empty(), "{:?}", settings.warnings());

        let orphan = self::settings(
            "[heap]\napi_key = \"default-heap-key\"\n\
             [sources.staging]\nsecrets = [\"staging-secret-0001\"]\napp_id = \"2\"\n",
        );
        let keys: Vec<String> = orphan.warnings().into_iter().map(|w| w.key).collect();
        assert_eq!(keys, ["heap.api_key"]);
        assert_eq!(names(&orphan.sources()), ["staging"]);
    }

    #[test]
    fn a_changed_api_key_is_applied_by_a_reload_though_both_print_redacted() {
        let with_keys = BASE
            .replace(
                "app_id = \"100\"",
                "app_id = \"100\"\napi_key = \"default-key-1\"",
            )
            .replace(
                "app_id = \"200\"",
                "app_id = \"200\"\napi_key = \"staging-key-1\"",
            );
        assert!(changes(&with_keys, &with_keys).is_empty());
        assert_eq!(
            changes(
                &with_keys,
                &with_keys.replace("default-key-1", "default-key-2")
            ),
            ReloadChanges {
                applied: vec!["heap.api_key".into()],
                ignored: vec![],
            }
        );
        assert_eq!(
            changes(
                &with_keys,
                &with_keys.replace("staging-key-1", "staging-key-2")
            )
            .applied,
            ["sources.staging.api_key"]
        );
        // Added where there was none: applied too.
        assert_eq!(
            changes(BASE, &with_keys).applied,
            ["heap.api_key", "sources.staging.api_key"]
        );
    }
}
