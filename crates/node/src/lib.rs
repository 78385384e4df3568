//! The streaming node: persistent connections, topics, relay, shared farm state, list service, admin.
//!
//! (Built under its own issue; this crate is a placeholder in the workspace until then.)
