//! The balance simulator: selection policies against farm scenarios.
//!
//! (Built under its own issue; this crate is a placeholder in the workspace until then.)
