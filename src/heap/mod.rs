//! Everything that goes to Heap: the pure mapping from a Userpilot [`Interaction`] to Heap
//! records ([`mapping`], `properties`), the wire types ([`wire`]), the HTTP client
//! ([`client`]) and the client of Heap's user deletion API ([`deletion`]).
//!
//! [`Interaction`]: crate::userpilot::Interaction

pub mod client;
pub mod deletion;
pub mod mapping;
pub(crate) mod properties;
pub mod wire;
