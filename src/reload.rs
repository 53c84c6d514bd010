//! Live reload (contract §10): SIGHUP or `POST /admin/reload` re-reads the configuration
//! files and environment. A valid result puts its sources (secrets, tolerance, identity, app
//! id) and `[mapping]` in force for every webhook received afterwards — a webhook in flight
//! finishes under the snapshot it started with, so none is refused or failed by the switch —
//! and starts a lane for an app id seen for the first time. Keys that need a restart
//! (listeners, queue, limits...) are reported as ignored and keep their running values. An
//! invalid result changes nothing: the error is logged and returned.
//!
//! Reloads are serialized, and counted in `relay_config_reloads_total{result}`.

use tokio::sync::Mutex;

use crate::config::{ConfigError, ReloadChanges, Settings};
use crate::forwarder::lanes::Lanes;
use crate::sources::{LiveSources, Sources};
use crate::telemetry;

/// Reads the configuration afresh, from the same places the process started from.
pub type Load = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

pub struct Reloader {
    /// Unset: the relay was built from settings it cannot read again (an embedded relay);
    /// a reload is refused.
    load: std::sync::Mutex<Option<Load>>,
    /// What the process started with: the values of the keys a reload cannot change.
    started: Settings,
    /// The configuration whose live keys are in force (the last valid reload); the lock also
    /// serializes reloads.
    live: Mutex<Settings>,
}

impl Reloader {
    pub fn new(started: Settings) -> Self {
        Self {
            live: Mutex::new(started.clone()),
            started,
            load: std::sync::Mutex::new(None),
        }
    }

    /// The configuration the process started with: the values in force of the keys a reload
    /// cannot change (a preview's batch size, for one).
    pub fn started(&self) -> &Settings {
        &self.started
    }

    /// Where reloads read the configuration from.
    pub fn set_load(&self, load: Load) {
        *self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(load);
    }

    fn read(&self) -> Result<Settings, ConfigError> {
        let load = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match load.as_ref() {
            Some(load) => load(),
            None => Err(ConfigError::Load(
                "this relay was started without a configuration to read again".to_owned(),
            )),
        }
    }

    /// Re-reads the configuration and, when it is valid, puts its live keys in force.
    /// `applied` lists the keys that changed since the last reload, `ignored` the keys that
    /// differ from what the process started with but need a restart.
    pub async fn reload(
        &self,
        sources: &LiveSources,
        lanes: &Lanes,
    ) -> Result<ReloadChanges, ConfigError> {
        let mut live = self.live.lock().await;
        let outcome = self.read().and_then(|new| {
            let built = Sources::from_settings(&new)?;
            Ok((new, built))
        });
        let (new, built) = match outcome {
            Ok(loaded) => loaded,
            Err(error) => {
                metrics::counter!("relay_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(
                    problems = ?error.problems(),
                    "configuration reload refused"
                );
                return Err(error);
            }
        };
        let changes = ReloadChanges {
            applied: live.reload_changes(&new).applied,
            ignored: self.started.reload_changes(&new).ignored,
        };
        for warning in new.warnings() {
            tracing::warn!(key = %warning.key, "{warning}");
        }
        for source in built.iter() {
            telemetry::zero_source_series(&source.name);
        }
        for app_id in built.app_ids() {
            if lanes.ensure(&app_id) {
                telemetry::zero_lane_series(app_id.as_str());
            }
        }
        sources.replace(built);
        *live = new;
        metrics::counter!("relay_config_reloads_total", "result" => "ok").increment(1);
        tracing::info!(
            applied = ?changes.applied,
            ignored = ?changes.ignored,
            "configuration reloaded"
        );
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const BASE: &str =
        "[heap]\napp_id = \"100\"\n[userpilot]\nsecrets = [\"production-secret-0001\"]\n";

    fn settings(extra: &str) -> Settings {
        Settings::from_toml(&format!("{BASE}{extra}")).unwrap()
    }

    /// A reloader whose "files" are whatever `next` holds at the time of the reload.
    fn reloader(next: Arc<std::sync::Mutex<String>>) -> Reloader {
        let reloader = Reloader::new(settings(""));
        reloader.set_load(Box::new(move || {
            Settings::from_toml(&format!("{BASE}{}", next.lock().unwrap()))
        }));
        reloader
    }

    #[tokio::test]
    async fn a_valid_reload_swaps_the_sources_and_starts_a_lane_for_a_new_app_id() {
        let next = Arc::new(std::sync::Mutex::new(String::new()));
        let reloader = reloader(next.clone());
        let live = LiveSources::new(Sources::from_settings(&settings("")).unwrap());
        let (lanes, _starts) = Lanes::new();
        *next.lock().unwrap() = "[sources.staging]\nsecrets = [\"staging-secret-00001\"]\n\
                                 app_id = \"200\"\n[server]\nlisten = \"127.0.0.1:1\"\n"
            .to_owned();
        let changes = reloader.reload(&live, &lanes).await.unwrap();
        assert!(
            changes
                .applied
                .iter()
                .any(|k| k.starts_with("sources.staging"))
        );
        assert_eq!(changes.ignored, ["server.listen"]);
        assert_eq!(
            live.current().get("staging").unwrap().app_id.as_str(),
            "200"
        );
        assert!(lanes.control("200").is_some());
        // Nothing changed since: nothing applied, and the restart-only key is still reported.
        let again = reloader.reload(&live, &lanes).await.unwrap();
        assert!(again.applied.is_empty(), "{:?}", again.applied);
        assert_eq!(again.ignored, ["server.listen"]);
    }

    #[tokio::test]
    async fn an_invalid_reload_keeps_the_running_sources() {
        let next = Arc::new(std::sync::Mutex::new(String::new()));
        let reloader = reloader(next.clone());
        let live = LiveSources::new(Sources::from_settings(&settings("")).unwrap());
        let (lanes, _starts) = Lanes::new();
        *next.lock().unwrap() = "[sources.staging]\napp_id = \"200\"\n".to_owned();
        let error = reloader.reload(&live, &lanes).await.unwrap_err();
        assert!(
            error.to_string().contains("sources.staging.secrets"),
            "{error}"
        );
        assert!(live.current().get("staging").is_none());
        assert!(live.current().default_source().is_some());
        assert!(lanes.control("200").is_none());
    }

    #[tokio::test]
    async fn a_relay_without_a_configuration_to_read_refuses_to_reload() {
        let reloader = Reloader::new(settings(""));
        let live = LiveSources::new(Sources::from_settings(&settings("")).unwrap());
        let (lanes, _starts) = Lanes::new();
        assert!(reloader.reload(&live, &lanes).await.is_err());
    }
}
