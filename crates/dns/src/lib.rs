//! The built-in DNS responder that answers the service name with the UP servers.
//!
//! (Built under its own issue; this crate is a placeholder in the workspace until then.)
