//! The client: reach the service, choose a server, keep the connection, fail over.
//!
//! (Built under its own issue; this crate is a placeholder in the workspace until then.)
