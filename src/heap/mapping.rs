//! The pure mapping from a decoded Userpilot [`Interaction`] to Heap records (SPEC §2.3–2.4):
//! event names matching Userpilot's native Heap integration, the NPS split, identity choice,
//! timestamps, idempotency keys, user/account properties, and the operator's `[mapping]`
//! renames and drops. No I/O, no clock: the receive time comes in as an argument.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::heap::wire::Outbound;
use crate::userpilot::Interaction;

/// The `[mapping]` configuration section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// Heap event name -> new name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Heap event names (after renaming) that are not sent.
    #[serde(default)]
    pub drop: Vec<String>,
}

/// Why an interaction cannot be sent to Heap. Such webhooks are quarantined as dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmappable {
    #[error("no user id in any known place")]
    NoUserId,
    #[error("the identity property `{0}` is missing from the user")]
    NoIdentity(String),
}

impl Unmappable {
    /// The dead-letter reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Unmappable::NoUserId => "no_user_id",
            Unmappable::NoIdentity(_) => "no_identity",
        }
    }
}

/// The mapping as configured.
#[derive(Debug, Clone)]
pub struct Mapper {
    // filled in by the implementation
}

impl Mapper {
    /// `identity` is `heap.identity`: `"user_id"` or the name of a user property.
    pub fn new(
        identity: &str,
        user_properties: bool,
        account_properties: bool,
        mapping: &MappingSettings,
    ) -> Self {
        todo!("{identity}{user_properties}{account_properties}{mapping:?}")
    }

    /// Maps one interaction. `body_digest` is the SHA-256 of the verified body: the
    /// idempotency keys derive from it, so a redelivered webhook maps to the same keys.
    pub fn map(
        &self,
        interaction: &Interaction,
        body_digest: &[u8; 32],
        received_at: DateTime<Utc>,
    ) -> Result<Vec<Outbound>, Unmappable> {
        todo!("{interaction:?}{body_digest:?}{received_at}")
    }
}
