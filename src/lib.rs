//! userpilot-heap-relay: receives signed Userpilot webhooks and delivers them to Heap.
pub mod heap;
pub mod secret;
pub mod userpilot;
