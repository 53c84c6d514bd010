//! What the overview shows over time (contract §11): webhooks counted per source and
//! outcome as they are answered, and a bounded history of samples (the last hour) of those
//! counts, of each lane's forwarded events and of its queue depth, taken by a task every few
//! seconds. Memory only: a restart starts the charts empty.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The counts and samples of this process.
#[derive(Debug, Default)]
pub struct Activity {
    /// Webhooks answered, per source label and outcome (the `relay_webhooks_total` labels).
    webhooks: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Activity {
    /// One webhook to `source` was answered with `outcome` (an `outcome` label of
    /// `relay_webhooks_total`).
    pub fn webhook(&self, source: &str, outcome: &'static str) {
        let mut webhooks = self
            .webhooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *webhooks.entry((source.to_owned(), outcome)).or_default() += 1;
    }
}
