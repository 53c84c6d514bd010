//! The sources a relay serves right now (contract §9): for each name, the secrets its
//! signatures are checked against, its timestamp tolerance, the transform and mapper its
//! payloads go through and the Heap app id (the forwarding lane) its records are queued for.
//! The sources of one configuration share one generation of transform workers
//! ([`Transforms`]), which holds every source's program: a reload builds new sources and with
//! them a new generation.
//!
//! [`Sources`] is built whole from [`Settings`] and never changed; a reload builds a new one
//! and [`LiveSources::replace`] swaps it in. A webhook takes the snapshot once, when it
//! arrives ([`LiveSources::current`]), and finishes under it: a request in flight during a
//! reload is answered as the configuration it started with says, and none is refused.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::config::{AppId, ConfigError, DEFAULT_SOURCE, Settings};
use crate::heap::mapping::Mapper;
use crate::secret::Secret;
use crate::transform::{Transform, Transforms, is_identity};

/// The label value that stands for "no configured source" in webhook metrics: a URL naming a
/// source that does not exist must not mint a time series per name a client makes up. It
/// cannot be a source's name (names start with a letter or digit).
pub const UNKNOWN_SOURCE_LABEL: &str = "_unknown";

/// One source as the webhook handler and replay use it.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    /// The URL path Userpilot posts to (`/webhooks/userpilot` for the default source, which
    /// also answers at `/webhooks/userpilot/default`).
    pub path: String,
    pub secrets: Vec<Secret>,
    pub tolerance_secs: u64,
    pub app_id: AppId,
    pub mapper: Mapper,
    /// Its jq program (compiled by the configuration's checks), or none.
    pub transform: Transform,
    /// Heap's API key for `app_id`: erasures also delete the user in Heap (contract §12).
    pub api_key: Option<Secret>,
}

/// Every configured source, by name.
#[derive(Debug, Default)]
pub struct Sources {
    by_name: BTreeMap<String, Arc<Source>>,
    transforms: Transforms,
}

impl Sources {
    /// The sources `settings` define, each with its mapper (its own identity, the shared
    /// `[mapping]`).
    pub fn from_settings(settings: &Settings) -> Result<Sources, ConfigError> {
        let mapping = settings.mapping()?;
        let mut programs = Vec::new();
        let by_name = settings
            .sources()
            .into_iter()
            .map(|source| {
                let mapper = Mapper::new(
                    &source.identity,
                    settings.heap.user_properties,
                    settings.heap.account_properties,
                    &mapping,
                );
                let name = source.name.to_string();
                let mapper = if name == DEFAULT_SOURCE {
                    mapper
                } else {
                    mapper.scoped_to_source(&name)
                };
                let transform = match source.transform.as_deref() {
                    Some(code) if !is_identity(code) => {
                        programs.push(code.to_owned());
                        Transform::Jq {
                            code: code.into(),
                            slot: programs.len() - 1,
                        }
                    }
                    _ => Transform::Identity,
                };
                let source = Source {
                    name: name.clone(),
                    path: source.path(),
                    secrets: source.secrets,
                    tolerance_secs: source.tolerance.as_secs(),
                    app_id: source.app_id,
                    mapper,
                    transform,
                    api_key: source.api_key,
                };
                (name, Arc::new(source))
            })
            .collect();
        let transforms = Transforms::new(programs);
        transforms.warm_up();
        Ok(Sources {
            by_name,
            transforms,
        })
    }

    /// The transform workers of this configuration, for [`crate::ingest::prepare`].
    pub fn transforms(&self) -> &Transforms {
        &self.transforms
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Source>> {
        self.by_name.get(name)
    }

    /// The source `/webhooks/userpilot` serves, if the top-level keys define one.
    pub fn default_source(&self) -> Option<&Arc<Source>> {
        self.get(DEFAULT_SOURCE)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Source>> {
        self.by_name.values()
    }

    /// The app ids the sources deliver to: one forwarding lane each.
    pub fn app_ids(&self) -> Vec<AppId> {
        let unique: BTreeMap<&str, &AppId> = self
            .iter()
            .map(|source| (source.app_id.as_str(), &source.app_id))
            .collect();
        unique.into_values().cloned().collect()
    }
}

impl FromIterator<Source> for Sources {
    fn from_iter<I: IntoIterator<Item = Source>>(sources: I) -> Self {
        let by_name = sources
            .into_iter()
            .map(|source| (source.name.clone(), Arc::new(source)))
            .collect();
        // Hand-built sources (tests) carry no jq program.
        Sources {
            by_name,
            transforms: Transforms::default(),
        }
    }
}

/// The sources in force, swapped whole by a reload.
#[derive(Debug)]
pub struct LiveSources {
    current: RwLock<Arc<Sources>>,
}

impl LiveSources {
    pub fn new(sources: Sources) -> Self {
        Self {
            current: RwLock::new(Arc::new(sources)),
        }
    }

    /// The sources in force now; the caller keeps this snapshot for the whole request.
    pub fn current(&self) -> Arc<Sources> {
        // A writer cannot panic while holding the lock (it only swaps an Arc), so a poisoned
        // lock still holds a whole snapshot.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `sources` in force for every request that starts from now on.
    pub fn replace(&self, sources: Sources) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(sources);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_sources(staging_secret: &str) -> Settings {
        Settings::from_toml(&format!(
            "[heap]\napp_id = \"100\"\nidentity = \"email\"\n\
             [userpilot]\nsecrets = [\"production-secret-0001\"]\n\
             [sources.staging]\nsecrets = [\"{staging_secret}\"]\napp_id = \"200\"\n\
             identity = \"user_id\"\ntolerance_secs = 60\n"
        ))
        .unwrap()
    }

    #[test]
    fn each_source_keeps_its_own_secrets_tolerance_identity_and_app_id() {
        let sources = Sources::from_settings(&two_sources("staging-secret-00001")).unwrap();
        let default = sources.default_source().unwrap();
        assert_eq!(default.name, "default");
        assert_eq!(default.app_id.as_str(), "100");
        assert_eq!(default.secrets[0].expose(), "production-secret-0001");
        assert_eq!(default.tolerance_secs, 300);
        assert_eq!(default.path, "/webhooks/userpilot");
        assert_eq!(
            sources.get("staging").unwrap().path,
            "/webhooks/userpilot/staging"
        );
        let staging = sources.get("staging").unwrap();
        assert_eq!(staging.app_id.as_str(), "200");
        assert_eq!(staging.secrets[0].expose(), "staging-secret-00001");
        assert_eq!(staging.tolerance_secs, 60);
        assert!(sources.get("production").is_none());
        let app_ids: Vec<String> = sources.app_ids().iter().map(AppId::to_string).collect();
        assert_eq!(app_ids, ["100", "200"]);
    }

    #[test]
    fn only_real_programs_get_a_worker_slot_and_identity_skips_the_workers() {
        let settings = Settings::from_toml(
            "[sources.a]\nsecrets = [\"secret-a-0000000001\"]\napp_id = \"7\"\n\
             transform = \"{x: 1}\"\n\
             [sources.b]\nsecrets = [\"secret-b-0000000001\"]\napp_id = \"7\"\n\
             transform = \" . \"\n\
             [sources.c]\nsecrets = [\"secret-c-0000000001\"]\napp_id = \"7\"\n\
             transform = \"select(.a)\"\n\
             [sources.d]\nsecrets = [\"secret-d-0000000001\"]\napp_id = \"7\"\n",
        )
        .unwrap();
        let sources = Sources::from_settings(&settings).unwrap();
        let transform = |name: &str| sources.get(name).unwrap().transform.clone();
        assert_eq!(
            transform("a"),
            Transform::Jq {
                code: "{x: 1}".into(),
                slot: 0
            }
        );
        assert_eq!(transform("b"), Transform::Identity);
        assert_eq!(
            transform("c"),
            Transform::Jq {
                code: "select(.a)".into(),
                slot: 1
            }
        );
        assert_eq!(transform("d"), Transform::Identity);
        assert_eq!(sources.transforms().len(), 2);
    }

    #[test]
    fn two_sources_on_one_app_id_make_one_lane() {
        let settings = Settings::from_toml(
            "[sources.a]\nsecrets = [\"secret-a-0000000001\"]\napp_id = \"7\"\n\
             [sources.b]\nsecrets = [\"secret-b-0000000001\"]\napp_id = \"7\"\n",
        )
        .unwrap();
        let sources = Sources::from_settings(&settings).unwrap();
        assert!(sources.default_source().is_none());
        assert_eq!(sources.iter().count(), 2);
        assert_eq!(sources.app_ids().len(), 1);
    }

    #[test]
    fn a_snapshot_taken_before_a_replace_stays_whole() {
        let live =
            LiveSources::new(Sources::from_settings(&two_sources("staging-secret-00001")).unwrap());
        let before = live.current();
        live.replace(Sources::from_settings(&two_sources("staging-secret-00002")).unwrap());
        let secret = |sources: &Sources| {
            sources.get("staging").unwrap().secrets[0]
                .expose()
                .to_owned()
        };
        assert_eq!(secret(&before), "staging-secret-00001");
        assert_eq!(secret(&live.current()), "staging-secret-00002");
    }
}
