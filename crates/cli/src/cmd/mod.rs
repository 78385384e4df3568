//! One module per subcommand: its `Args` and its `run`.

pub(crate) mod bench;
pub(crate) mod cert;
pub(crate) mod chaos;
pub(crate) mod demo;
pub(crate) mod drain;
pub(crate) mod list;
pub(crate) mod load;
pub(crate) mod pick;
pub(crate) mod publish;
pub(crate) mod secret;
pub(crate) mod serve;
pub(crate) mod sim;
pub(crate) mod sub;
pub(crate) mod token;
