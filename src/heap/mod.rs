//! Everything that goes to Heap: the pure mapping from a Userpilot [`Interaction`] to Heap
//! records ([`mapping`], `properties`), the wire types ([`wire`]) and the HTTP client
//! ([`client`]).
//!
//! [`Interaction`]: crate::userpilot::Interaction

pub mod client;
pub mod mapping;
pub(crate) mod properties;
pub mod wire;
