//! The responder over real sockets: hickory-resolver, `dig`, and hand-made packets against a
//! responder on 127.0.0.1 serving a farm on 127.0.0.1/.2/.3.

mod abuse;
mod dig;
mod lifecycle;
mod resolver;
mod support;
