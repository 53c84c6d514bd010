//! Everything that comes from Userpilot: the `X-Signature` check over the raw bytes
//! (`signature`) and the tolerant decoder that turns verified bytes into a typed
//! [`Interaction`] (`payload`). Both are pure: no I/O, the clock comes in as an argument.

mod payload;
mod signature;

pub use payload::{Action, Company, DecodeError, Interaction, Kind, User, decode, kind_and_action};
pub use signature::{SignatureError, Verified, sign, verify};
