//! The failover state machine: what a client does next, as a pure function of what just happened.
//!
//! [`Machine::handle`] takes an [`Input`] (a list arrived, a connection opened or broke, a timer
//! fired…) and the current time, moves to its next [`State`] and returns the [`Action`]s for the
//! I/O driver to carry out (fetch a list, connect, sleep, tell the application). It does no I/O,
//! reads no clock and draws from its own seeded RNG, so every transition is unit-tested without
//! sockets or sleeps.
//!
//! # The algorithm (the seeds' client, plus cool-down and backoff)
//! 1. **Round**: fetch the farm list through the service address; select a server with the policy,
//!    excluding servers that failed within the cool-down — unless the list has no other
//!    candidate, when they are chosen among rather than waited for; connect to it. When the list
//!    came over a connection to the very server picked, that connection is kept (no second
//!    connect).
//! 2. **Immediate, or retry once**: when a connection attempt fails, or an established connection
//!    closes, breaks or misses its heartbeats, the default [`RetryMode::Immediate`] goes straight
//!    to a new round (the seeds' alternative embodiment); [`RetryMode::RetryOnce`] first tries the
//!    same server once more (the seeds' main embodiment). A server that closes with
//!    [`RECONNECT_ELSEWHERE`](streamfarm_core::protocol::close::RECONNECT_ELSEWHERE) or
//!    [`GOING_AWAY`](streamfarm_core::protocol::close::GOING_AWAY) (or refuses as full) is never
//!    retried: see [`sends_elsewhere`].
//! 3. **Re-request**: a server that failed its retry is excluded for the cool-down and a new round
//!    starts. A client that has a list (the one its server kept pushing until the loss) selects
//!    on it with the policy, without the excluded servers, and asks its pick for the fresh list —
//!    then the other servers of that list, and the service address only when none of them answers
//!    (the address may still resolve to the dead server, and each attempt there is wasted). When
//!    the fresh list comes from the pick and still shows it as a candidate (live, in the most
//!    preferred group that has any, not excluded), the pick stands and the connection the list
//!    came over is kept: a failover costs the survivors one connection. Otherwise the client
//!    selects again on the fresh list. A client without a list, or without a candidate on it,
//!    asks the service address first, then the other servers of its last list.
//! 4. **Backoff**: the first round after a good connection starts at once; each further round
//!    waits a full-jitter [`Backoff`] delay.
//! 5. **Migration** (make-before-break): a server that asks its client to move
//!    ([`Input::MigrateAsked`], its `migrate` frame) names where, or leaves it to the policy
//!    (without the asking server). The machine asks for [`Action::Migrate`] — a second connection,
//!    subscribed from the held positions while the first keeps delivering — and moves to
//!    [`State::Connected`] on the new server once the driver reports it caught up
//!    ([`Input::Migrated`]). A migration whose connection fails leaves the client where it was,
//!    with the target excluded; losing the old server meanwhile makes the migration's connection
//!    the failover's.
//!
//! ```
//! use std::time::Instant;
//! use streamfarm_client::machine::{Action, Input, Machine, MachineConfig, ListSource};
//! let mut machine = Machine::new(MachineConfig::default(), 7);
//! let actions = machine.handle(Input::Start, Instant::now());
//! assert!(matches!(&actions[..], [Action::FetchList(ListSource::ServiceAddress { .. })]));
//! ```

use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use streamfarm_core::protocol::close;
use streamfarm_core::selection::{self, Context, Policy};
use streamfarm_core::{FarmList, Status};

use crate::backoff::Backoff;
use crate::topics::Topics;

/// What to do when a connection attempt fails or a connection is lost.
///
/// The trade-off, measured (`streamfarm bench failover`, BENCHMARKS.md): when the server truly
/// failed, the retry costs one more connection attempt per client (1.65–1.98 C attempts in all
/// against 1.006–1.026 C; on the survivors both are 1.0 C) and a longer tail. What the retry
/// buys — a lone server that restarts is found again at once — `Immediate` gets too: a server
/// in its cool-down is still chosen when the list has no other candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// Try the same server once more before re-requesting the list (the seeds' main embodiment).
    RetryOnce,
    /// Re-request the list at once (the seeds' alternative embodiment; the default).
    #[default]
    Immediate,
}

/// The knobs of the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    /// How to choose among the servers of a list.
    pub policy: Policy,
    /// Retry the same server once, or re-request at once.
    pub retry: RetryMode,
    /// How long a server that failed stays excluded from selection.
    pub cool_down: Duration,
    /// The wait between failed rounds.
    pub backoff: Backoff,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            policy: Policy::default(),
            retry: RetryMode::default(),
            cool_down: Duration::from_secs(10),
            backoff: Backoff::default(),
        }
    }
}

/// Why an established connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossCause {
    /// The server closed the connection with this WebSocket close code and reason.
    Closed {
        /// The close code (see [`streamfarm_core::protocol::close`]).
        code: u16,
        /// The reason text the server gave.
        reason: String,
    },
    /// Nothing arrived from the server within the heartbeat timeout: it is hung or unreachable.
    HeartbeatTimeout,
    /// The connection broke without a close frame (reset, end of stream, protocol error).
    Broken(String),
}

/// Whether a close code tells the client to go to another server rather than retry this one:
/// draining or rebalancing (`4000`), shutting down (`1001`), full (`4003`), or a transport-level
/// policy violation (`1008`), as `docs/PROTOCOL.md` says.
pub fn sends_elsewhere(code: u16) -> bool {
    matches!(
        code,
        close::RECONNECT_ELSEWHERE
            | close::GOING_AWAY
            | close::SERVER_FULL
            | close::POLICY_VIOLATION
    )
}

impl LossCause {
    /// The server asked the client to go elsewhere: no retry of the same server.
    pub fn sends_elsewhere(&self) -> bool {
        matches!(self, LossCause::Closed { code, .. } if sends_elsewhere(*code))
    }
}

impl std::fmt::Display for LossCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossCause::Closed { code, reason } if reason.is_empty() => write!(f, "closed ({code})"),
            LossCause::Closed { code, reason } => write!(f, "closed ({code}: {reason})"),
            LossCause::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            LossCause::Broken(detail) => write!(f, "broken ({detail})"),
        }
    }
}

/// Where a list is to be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListSource {
    /// Any server of the service address. `avoid` holds the urls of servers that just failed:
    /// addresses that are theirs are tried last, so a hung server does not cost a timeout first.
    ServiceAddress {
        /// Server urls to try last.
        avoid: Vec<String>,
    },
    /// These servers of the last list, in order (the service address gave nothing).
    Servers(Vec<String>),
}

/// Something that happened, reported to the machine by the driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The application started the client.
    Start,
    /// A list arrived from the server at `via` (its url, from its `hello`); the driver holds the
    /// connection it came over until told to use or drop it.
    ListFetched {
        /// The farm list.
        list: FarmList,
        /// Url of the server that sent it.
        via: String,
        /// How old the list is (from its `generated_at_ms`; zero when unknown): the `waterfill`
        /// policy allows for the clients that joined since.
        age: Duration,
    },
    /// No source of the last [`Action::FetchList`] gave a list.
    ListFailed {
        /// What went wrong, for people.
        error: String,
    },
    /// The connection to `server` is open and every topic is subscribed on it.
    Connected {
        /// The server's url.
        server: String,
        /// The list the server sent on connecting, if it sent one.
        list: Option<FarmList>,
    },
    /// Connecting (or subscribing) to `server` failed.
    ConnectFailed {
        /// The server's url.
        server: String,
        /// What went wrong, for people.
        error: String,
        /// The server refused with a close code that sends clients elsewhere (draining, full):
        /// no retry of it.
        elsewhere: bool,
    },
    /// The established connection to `server` ended.
    Lost {
        /// The server's url.
        server: String,
        /// Why.
        cause: LossCause,
    },
    /// The connected server sent a newer list.
    ListUpdated(FarmList),
    /// The connected server asked the client to move (a `migrate` frame): to `to`, or to a
    /// server of the client's choosing.
    MigrateAsked {
        /// The server asking (the connected one).
        server: String,
        /// Where to, when the server named it.
        to: Option<String>,
        /// The frame's reason (`rebalance`, `drain`, `shutdown`).
        reason: String,
    },
    /// The migration's new connection is subscribed and caught up, and the old one closed: the
    /// client now streams from `server`.
    Migrated {
        /// The new server's url.
        server: String,
    },
    /// The timer of an [`Action::Sleep`] ran out.
    TimerFired {
        /// The `timer` of that action.
        timer: u64,
    },
    /// The application closes the client.
    Stop,
}

/// Something for the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch the farm list (`hello` + `farm` on a new connection), keep that connection, and report
    /// [`Input::ListFetched`] or [`Input::ListFailed`].
    FetchList(ListSource),
    /// Connect to `server` and subscribe every topic; report [`Input::Connected`] or
    /// [`Input::ConnectFailed`]. With `reuse_list_connection`, the connection the list came over
    /// is that server's: subscribe on it instead of opening another.
    Connect {
        /// The server's url.
        server: String,
        /// Use the held list connection.
        reuse_list_connection: bool,
        /// This is the retry of a server just lost or refused: the driver gives it a shorter
        /// connect timeout (a server that was fine a moment ago answers at once or not at all;
        /// a dying one can leave a SYN unanswered until the timeout).
        retry: bool,
    },
    /// Make-before-break: connect to `server` and subscribe every topic from its position, as a
    /// migration (the old connection stays open and keeps delivering); report
    /// [`Input::Migrated`] once the new connection has caught up and the old one is closed, or
    /// [`Input::ConnectFailed`].
    Migrate {
        /// The new server's url.
        server: String,
    },
    /// Close the held list connection (its server was not picked, or the round is over).
    DropListConnection,
    /// Report [`Input::TimerFired`] with `timer` after `delay`.
    Sleep {
        /// How long.
        delay: Duration,
        /// Identifies the timer; older timers are stale.
        timer: u64,
    },
    /// Tell the application.
    Notify(Notice),
    /// Close the established connection: the client stops.
    Close,
}

/// What the application is told about the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Connected and subscribed to `server`.
    Connected {
        /// The server's url.
        server: String,
    },
    /// The connection to `server` ended.
    Disconnected {
        /// The server's url.
        server: String,
        /// Why.
        cause: LossCause,
    },
    /// Connected again after a loss, `took` after the loss (`to` may equal `from` when the retry
    /// of the same server worked). Messages published meanwhile may be missing.
    FailedOver {
        /// The server that was lost.
        from: String,
        /// The server now connected.
        to: String,
        /// From the loss to being subscribed again.
        took: Duration,
    },
    /// Moved from `from` to `to` at `from`'s request, make-before-break: `took` from the request
    /// to streaming from `to`.
    Migrated {
        /// The server left.
        from: String,
        /// The server now connected.
        to: String,
        /// Why the old server asked (`rebalance`, `drain`, `shutdown`).
        reason: String,
        /// From the request to the switch.
        took: Duration,
    },
    /// A migration's new connection failed: the client stays on `server` (which closes it with
    /// `4000` at its deadline if it still wants it gone).
    MigrationFailed {
        /// The server the client stays on.
        server: String,
        /// The server it could not move to.
        to: String,
        /// What went wrong.
        error: String,
    },
    /// A round found no server; the next starts after `delay`.
    Retrying {
        /// Why the round failed.
        reason: String,
        /// The backoff before the next round.
        delay: Duration,
    },
}

/// Where the machine is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not started.
    Idle,
    /// Waiting for a list.
    FetchingList {
        /// From the service address (else from the servers of the last list).
        from_service_address: bool,
        /// The other source is still to be asked when this one gives nothing.
        fallback: bool,
    },
    /// Waiting for a connection to `server`.
    Connecting {
        /// The server's url.
        server: String,
        /// This is the one retry of the same server.
        retry: bool,
    },
    /// Connected and subscribed.
    Connected {
        /// The server's url.
        server: String,
    },
    /// Connected to `from`, and connecting to `to` to move there (see [`Action::Migrate`]).
    Migrating {
        /// The connected server.
        from: String,
        /// The server moving to.
        to: String,
        /// Why `from` asked.
        reason: String,
        /// When it asked.
        since: Instant,
    },
    /// Backing off before the next round.
    Waiting {
        /// The timer that ends the wait.
        timer: u64,
    },
    /// Stopped for good.
    Stopped,
}

/// The failover state machine (see the module documentation).
#[derive(Debug)]
pub struct Machine {
    config: MachineConfig,
    state: State,
    rng: StdRng,
    /// The most recent list, for selection and for asking its servers when the address fails.
    last_list: Option<FarmList>,
    /// Servers that failed, with the end of their cool-down.
    excluded: Vec<(String, Instant)>,
    /// Failed rounds since the last good connection; the next round's backoff grows with it.
    round: u32,
    /// The server lost and when, until connected again: for `FailedOver`.
    away: Option<(String, Instant)>,
    /// The driver holds a list connection that is not yet used or dropped.
    holding_list_connection: bool,
    /// The server picked on the last list and asked for a new one: it stays the pick if the new
    /// list still shows it as a candidate (see the module documentation).
    asked: Option<String>,
    next_timer: u64,
    /// Every server url seen in a list, newest last (at most [`MAX_KNOWN`]): when neither the
    /// last list nor the service address gives a server, these are tried too, so that a client
    /// is never stranded while any server it ever heard of is up.
    known: Vec<String>,
    /// The topics and the position held in each.
    topics: Topics,
}

/// Most server urls a machine remembers beyond its last list.
const MAX_KNOWN: usize = 256;

impl Machine {
    /// A machine in [`State::Idle`], drawing from an RNG seeded with `seed`.
    pub fn new(config: MachineConfig, seed: u64) -> Self {
        Machine {
            config,
            state: State::Idle,
            rng: StdRng::seed_from_u64(seed),
            last_list: None,
            excluded: Vec::new(),
            round: 0,
            away: None,
            holding_list_connection: false,
            asked: None,
            next_timer: 0,
            known: Vec::new(),
            topics: Topics::default(),
        }
    }

    /// The topics and the position held in each.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The topics, to subscribe, unsubscribe and take in messages, `subscribed` and `gap` frames.
    pub fn topics_mut(&mut self) -> &mut Topics {
        &mut self.topics
    }

    /// Remembers the servers of `list`.
    fn learn(&mut self, list: &FarmList) {
        for server in &list.servers {
            if let Some(at) = self.known.iter().position(|u| *u == server.url) {
                self.known.remove(at);
            }
            self.known.push(server.url.clone());
        }
        if self.known.len() > MAX_KNOWN {
            let extra = self.known.len() - MAX_KNOWN;
            self.known.drain(..extra);
        }
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The most recent farm list, if any arrived.
    pub fn last_list(&self) -> Option<&FarmList> {
        self.last_list.as_ref()
    }

    /// The server picked on the last list and asked for a fresh one, while the machine waits for
    /// that list: it stays the pick if the list still shows it as a candidate.
    pub fn asked(&self) -> Option<&str> {
        match self.state {
            State::FetchingList { .. } => self.asked.as_deref(),
            _ => None,
        }
    }

    /// Servers excluded from selection at `now`.
    pub fn excluded(&self, now: Instant) -> Vec<String> {
        self.excluded
            .iter()
            .filter(|(_, until)| *until > now)
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// The servers selection on `list` leaves out at `now`: those excluded — unless that leaves
    /// `list` no candidate, when none is left out. A cool-down steers a client away from a server
    /// that failed while another can take it; it never keeps a client from the only servers it
    /// has (a lone server that restarts, a farm restarting as a whole): those are tried again,
    /// paced by the backoff, as a retry would.
    fn excluded_on(&self, list: &FarmList, now: Instant) -> Vec<String> {
        let exclude = self.excluded(now);
        if exclude.is_empty() || selection::candidates(list, &exclude).is_ok() {
            exclude
        } else {
            Vec::new()
        }
    }

    /// Takes in what happened at `now` and returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        self.excluded.retain(|(_, until)| *until > now);
        let mut actions = Vec::new();
        match (std::mem::replace(&mut self.state, State::Stopped), input) {
            (State::Stopped, _) => {}
            (_, Input::Stop) => {
                self.drop_list_connection(&mut actions);
                actions.push(Action::Close);
            }
            (state, Input::ListUpdated(list)) => {
                self.learn(&list);
                self.last_list = Some(list);
                self.state = state;
            }
            (State::Idle, Input::Start) => self.next_round(None, now, &mut actions),
            (State::FetchingList { .. }, Input::ListFetched { mut list, via, age }) => {
                self.holding_list_connection = true;
                self.learn(&list);
                // The list server counts the connection the list came over among its users;
                // that user is this client, which has not chosen yet.
                if let Some(entry) = list.servers.iter_mut().find(|s| s.url == via) {
                    entry.users = entry.users.saturating_sub(1);
                }
                self.select(list, &via, age, now, &mut actions);
            }
            (
                State::FetchingList {
                    from_service_address,
                    fallback: true,
                },
                Input::ListFailed { error },
            ) => {
                // The pick did not answer: whatever list comes next is selected on afresh.
                self.asked = None;
                if from_service_address {
                    let others = self.other_servers(now);
                    if others.is_empty() {
                        self.next_round(Some(error), now, &mut actions);
                    } else {
                        self.state = State::FetchingList {
                            from_service_address: false,
                            fallback: false,
                        };
                        actions.push(Action::FetchList(ListSource::Servers(others)));
                    }
                } else {
                    self.fetch_from_service_address(false, now, &mut actions);
                }
            }
            (
                State::FetchingList {
                    fallback: false, ..
                },
                Input::ListFailed { error },
            ) => self.next_round(Some(error), now, &mut actions),
            (State::Connecting { server, .. }, Input::Connected { server: done, list })
                if server == done =>
            {
                self.drop_list_connection(&mut actions);
                if let Some(list) = list {
                    self.learn(&list);
                    self.last_list = Some(list);
                }
                self.round = 0;
                actions.push(Action::Notify(Notice::Connected {
                    server: server.clone(),
                }));
                if let Some((from, since)) = self.away.take() {
                    actions.push(Action::Notify(Notice::FailedOver {
                        from,
                        to: server.clone(),
                        took: now.saturating_duration_since(since),
                    }));
                }
                self.state = State::Connected { server };
            }
            (
                State::Connecting { server, retry },
                Input::ConnectFailed {
                    server: failed,
                    error,
                    elsewhere,
                },
            ) if server == failed => {
                // A reused list connection is gone with the failure; any other is no use now.
                self.drop_list_connection(&mut actions);
                if !retry && !elsewhere && self.config.retry == RetryMode::RetryOnce {
                    actions.push(Action::Connect {
                        server: server.clone(),
                        reuse_list_connection: false,
                        retry: true,
                    });
                    self.state = State::Connecting {
                        server,
                        retry: true,
                    };
                } else {
                    self.exclude(server.clone(), now);
                    self.next_round(Some(format!("{server}: {error}")), now, &mut actions);
                }
            }
            (
                State::Connected { server },
                Input::Lost {
                    server: lost,
                    cause,
                },
            ) if server == lost => {
                self.away = Some((server.clone(), now));
                self.topics.on_lost();
                actions.push(Action::Notify(Notice::Disconnected {
                    server: server.clone(),
                    cause: cause.clone(),
                }));
                if cause.sends_elsewhere() || self.config.retry == RetryMode::Immediate {
                    self.exclude(server, now);
                    self.next_round(None, now, &mut actions);
                } else {
                    actions.push(Action::Connect {
                        server: server.clone(),
                        reuse_list_connection: false,
                        retry: true,
                    });
                    self.state = State::Connecting {
                        server,
                        retry: true,
                    };
                }
            }
            (
                State::Connected { server },
                Input::MigrateAsked {
                    server: asking,
                    to,
                    reason,
                },
            ) if server == asking => match self.migration_target(&server, to, now) {
                Some(to) => {
                    actions.push(Action::Migrate { server: to.clone() });
                    self.state = State::Migrating {
                        from: server,
                        to,
                        reason,
                        since: now,
                    };
                }
                // Nowhere to go: stay; the server closes the connection at its deadline and the
                // failover takes over then.
                None => self.state = State::Connected { server },
            },
            (
                State::Migrating {
                    from,
                    to,
                    reason,
                    since,
                },
                Input::Migrated { server },
            ) if server == to => {
                self.round = 0;
                actions.push(Action::Notify(Notice::Migrated {
                    from,
                    to: to.clone(),
                    reason,
                    took: now.saturating_duration_since(since),
                }));
                self.state = State::Connected { server: to };
            }
            (
                State::Migrating { from, to, .. },
                Input::ConnectFailed {
                    server: failed,
                    error,
                    ..
                },
            ) if failed == to => {
                self.exclude(to.clone(), now);
                actions.push(Action::Notify(Notice::MigrationFailed {
                    server: from.clone(),
                    to,
                    error,
                }));
                self.state = State::Connected { server: from };
            }
            (
                State::Migrating { from, to, .. },
                Input::Lost {
                    server: lost,
                    cause,
                },
            ) if lost == from => {
                // The old connection ended before the new one was up: the migration's connect
                // goes on as the failover's.
                self.away = Some((from.clone(), now));
                self.topics.on_lost();
                self.exclude(from.clone(), now);
                actions.push(Action::Notify(Notice::Disconnected {
                    server: from,
                    cause,
                }));
                self.state = State::Connecting {
                    server: to,
                    retry: false,
                };
            }
            (State::Waiting { timer }, Input::TimerFired { timer: fired }) if timer == fired => {
                self.request_list(now, &mut actions);
            }
            // Anything else is stale (a timer already superseded, a report about a connection
            // the machine has moved on from) or cannot happen: ignore it, stay put.
            (state, _) => self.state = state,
        }
        actions
    }

    /// Picks a server of `list` and connects to it, reusing the list connection when it is the
    /// pick; or, when no server is available, ends the round.
    fn select(
        &mut self,
        list: FarmList,
        via: &str,
        age: Duration,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let exclude = self.excluded_on(&list, now);
        // The pick made on the last list stands if its own fresh list still has it as a
        // candidate: selecting again would move the client off a good connection only because
        // the list server counts its own new users at once and the others' a gossip round late.
        let asked = self.asked.take().filter(|pick| *pick == via);
        let stands = asked.and_then(|pick| {
            let candidates = selection::candidates(&list, &exclude).ok()?;
            candidates
                .indices
                .into_iter()
                .find(|&i| list.servers[i].url == pick)
        });
        let choice = match stands {
            Some(index) => Ok(index),
            None => {
                let context = self.context(&list, age);
                let policy = self.config.policy;
                selection::choose_with(policy, &list, &exclude, &context, &mut self.rng)
                    .map(|choice| choice.index)
            }
        };
        match choice {
            Ok(index) => {
                let server = list.servers[index].url.clone();
                let reuse = server == via;
                if reuse {
                    // The connection now belongs to the Connect; the driver no longer holds it.
                    self.holding_list_connection = false;
                }
                actions.push(Action::Connect {
                    server: server.clone(),
                    reuse_list_connection: reuse,
                    retry: false,
                });
                self.state = State::Connecting {
                    server,
                    retry: false,
                };
            }
            Err(err) => {
                self.drop_list_connection(actions);
                self.next_round(Some(err.to_string()), now, actions);
            }
        }
        self.last_list = Some(list);
    }

    /// What the policy is told besides `list` (this old).
    fn context(&self, list: &FarmList, age: Duration) -> Context {
        // A client failing over knows its old server's users are all reconnecting now: the
        // staleness-aware policy allows for that surge; the others ignore the context.
        match &self.away {
            Some((lost, _)) => Context::reconnecting(list, lost, age, self.config.backoff.base()),
            None => Context::with_age(age),
        }
    }

    /// Starts the next round: at once after a good connection, else after the backoff.
    /// `failure` says why the previous round failed, if one did.
    fn next_round(&mut self, failure: Option<String>, now: Instant, actions: &mut Vec<Action>) {
        let round = self.round;
        self.round = self.round.saturating_add(1);
        if round == 0 {
            self.request_list(now, actions);
            return;
        }
        let delay = self.config.backoff.delay(round - 1, &mut self.rng);
        let timer = self.next_timer;
        self.next_timer += 1;
        actions.push(Action::Notify(Notice::Retrying {
            reason: failure.unwrap_or_else(|| "no server reached".to_string()),
            delay,
        }));
        actions.push(Action::Sleep { delay, timer });
        self.state = State::Waiting { timer };
    }

    /// Asks for a list: from the server the policy picks on the last list (then the other
    /// servers of that list, in a random order), with the service address as the fallback; or,
    /// without a list or a candidate on it, from the service address first.
    fn request_list(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let exclude = self.excluded(now);
        let pick = match &self.last_list {
            Some(list) => {
                let context = self.context(list, Duration::ZERO);
                let policy = self.config.policy;
                selection::choose_with(policy, list, &exclude, &context, &mut self.rng)
                    .ok()
                    .map(|choice| list.servers[choice.index].url.clone())
            }
            None => None,
        };
        let Some(pick) = pick else {
            self.asked = None;
            self.fetch_from_service_address(true, now, actions);
            return;
        };
        let (mut listed, known) = self.other_servers_apart(now);
        listed.retain(|url| *url != pick);
        // Clients whose pick does not answer spread over the rest rather than all asking the
        // first of the list.
        listed.shuffle(&mut self.rng);
        let mut urls = vec![pick.clone()];
        urls.extend(listed);
        urls.extend(known.into_iter().filter(|url| *url != pick));
        self.asked = Some(pick);
        actions.push(Action::FetchList(ListSource::Servers(urls)));
        self.state = State::FetchingList {
            from_service_address: false,
            fallback: true,
        };
    }

    fn fetch_from_service_address(
        &mut self,
        fallback: bool,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::FetchList(ListSource::ServiceAddress {
            avoid: self.excluded(now),
        }));
        self.state = State::FetchingList {
            from_service_address: true,
            fallback,
        };
    }

    /// Servers that may answer a list request, not excluded: those of the last list that are not
    /// `DOWN` (a draining server still serves lists), then every other server ever known, most
    /// recently seen first (a list can be stale, or come from a node cut off from the farm).
    fn other_servers(&self, now: Instant) -> Vec<String> {
        let (mut listed, known) = self.other_servers_apart(now);
        listed.extend(known);
        listed
    }

    /// [`Machine::other_servers`] in its two parts: from the last list, and known besides.
    fn other_servers_apart(&self, now: Instant) -> (Vec<String>, Vec<String>) {
        let exclude = self.excluded(now);
        let listed: Vec<String> = self
            .last_list
            .iter()
            .flat_map(|list| &list.servers)
            .filter(|s| s.status != Status::Down && !exclude.contains(&s.url))
            .map(|s| s.url.clone())
            .collect();
        let known = self
            .known
            .iter()
            .rev()
            .filter(|url| !exclude.contains(url) && !listed.contains(url))
            .cloned()
            .collect();
        (listed, known)
    }

    /// Where to move from `from`: the server named, unless the client just failed to reach it;
    /// else the policy's pick on the last list, without `from`.
    fn migration_target(&mut self, from: &str, to: Option<String>, now: Instant) -> Option<String> {
        let mut exclude = self.excluded(now);
        if let Some(to) = to.filter(|to| to != from && !exclude.contains(to)) {
            return Some(to);
        }
        exclude.push(from.to_string());
        let list = self.last_list.as_ref()?;
        let context = Context::with_age(Duration::ZERO);
        selection::choose_with(self.config.policy, list, &exclude, &context, &mut self.rng)
            .ok()
            .map(|choice| list.servers[choice.index].url.clone())
    }

    fn exclude(&mut self, server: String, now: Instant) {
        self.excluded.retain(|(url, _)| *url != server);
        self.excluded.push((server, now + self.config.cool_down));
    }

    fn drop_list_connection(&mut self, actions: &mut Vec<Action>) {
        if std::mem::take(&mut self.holding_list_connection) {
            actions.push(Action::DropListConnection);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamfarm_core::ServerEntry;

    const A: &str = "ws://a/stream";
    const B: &str = "ws://b/stream";
    const C: &str = "ws://c/stream";

    fn list(servers: &[(&str, Status, u64, &str)]) -> FarmList {
        FarmList::new(
            servers
                .iter()
                .map(|&(url, status, users, group)| {
                    ServerEntry::new(url, url, status, users, group)
                })
                .collect(),
        )
    }

    fn only(url: &str) -> FarmList {
        list(&[(url, Status::Up, 0, "A")])
    }

    fn machine(retry: RetryMode) -> Machine {
        Machine::new(
            MachineConfig {
                retry,
                ..MachineConfig::default()
            },
            1,
        )
    }

    fn connect(server: &str, reuse: bool) -> Action {
        Action::Connect {
            server: server.to_string(),
            reuse_list_connection: reuse,
            retry: false,
        }
    }

    fn retry_of(server: &str) -> Action {
        Action::Connect {
            server: server.to_string(),
            reuse_list_connection: false,
            retry: true,
        }
    }

    fn fetch(avoid: &[&str]) -> Action {
        Action::FetchList(ListSource::ServiceAddress {
            avoid: avoid.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn servers(urls: &[&str]) -> Action {
        Action::FetchList(ListSource::Servers(
            urls.iter().map(|s| s.to_string()).collect(),
        ))
    }

    fn fetched(list: FarmList, via: &str) -> Input {
        Input::ListFetched {
            list,
            via: via.to_string(),
            age: Duration::ZERO,
        }
    }

    fn connected(server: &str) -> Input {
        Input::Connected {
            server: server.to_string(),
            list: None,
        }
    }

    fn failed(server: &str) -> Input {
        Input::ConnectFailed {
            server: server.to_string(),
            error: "refused".to_string(),
            elsewhere: false,
        }
    }

    fn lost(server: &str, cause: LossCause) -> Input {
        Input::Lost {
            server: server.to_string(),
            cause,
        }
    }

    fn closed(code: u16) -> LossCause {
        LossCause::Closed {
            code,
            reason: String::new(),
        }
    }

    /// A machine connected to `server` (the only server of its first list) at `t0`.
    fn connected_to(server: &str, retry: RetryMode, t0: Instant) -> Machine {
        let mut m = machine(retry);
        m.handle(Input::Start, t0);
        m.handle(fetched(only(server), server), t0);
        m.handle(connected(server), t0);
        assert_eq!(
            m.state(),
            &State::Connected {
                server: server.to_string()
            }
        );
        m
    }

    fn sleep_of(actions: &[Action]) -> (Duration, u64) {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Sleep { delay, timer } => Some((*delay, *timer)),
                _ => None,
            })
            .expect("a Sleep action")
    }

    #[test]
    fn start_fetches_the_list_from_the_service_address() {
        let mut m = machine(RetryMode::RetryOnce);
        assert_eq!(m.handle(Input::Start, Instant::now()), vec![fetch(&[])]);
        assert_eq!(
            m.state(),
            &State::FetchingList {
                from_service_address: true,
                fallback: true
            }
        );
    }

    #[test]
    fn list_from_the_picked_server_keeps_that_connection() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        let actions = m.handle(fetched(only(A), A), t0);
        assert_eq!(actions, vec![connect(A, true)]);
        // The reused connection is not dropped when it succeeds.
        let actions = m.handle(connected(A), t0);
        assert_eq!(
            actions,
            vec![Action::Notify(Notice::Connected {
                server: A.to_string()
            })]
        );
    }

    #[test]
    fn list_from_another_server_connects_to_the_pick_then_drops_the_first() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        let three = list(&[
            (A, Status::Up, 10, "A"),
            (B, Status::Down, 0, "A"),
            (C, Status::Up, 10, "B"),
        ]);
        // Only A is a candidate (B is down, C is in a less preferred group); the list came via C.
        let actions = m.handle(fetched(three, C), t0);
        assert_eq!(actions, vec![connect(A, false)]);
        let actions = m.handle(connected(A), t0);
        assert_eq!(
            actions,
            vec![
                Action::DropListConnection,
                Action::Notify(Notice::Connected {
                    server: A.to_string()
                })
            ]
        );
        assert_eq!(m.last_list().unwrap().servers.len(), 3);
    }

    #[test]
    fn the_list_server_does_not_count_this_client() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        m.handle(
            fetched(list(&[(A, Status::Up, 1, "A"), (B, Status::Up, 0, "A")]), A),
            t0,
        );
        // A's one user is this client's list connection: both servers are empty.
        assert_eq!(m.last_list().unwrap().servers[0].users, 0);
    }

    #[test]
    fn no_server_available_drops_the_list_connection_and_backs_off() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        let actions = m.handle(fetched(list(&[(A, Status::Down, 0, "A")]), A), t0);
        assert_eq!(actions[0], Action::DropListConnection);
        assert!(
            matches!(&actions[1], Action::Notify(Notice::Retrying { reason, .. })
            if reason.contains("no server available"))
        );
        let (delay, timer) = sleep_of(&actions);
        assert!(delay < Backoff::default().ceiling(0));
        assert_eq!(m.state(), &State::Waiting { timer });
    }

    #[test]
    fn unreachable_service_address_asks_the_servers_of_the_last_list() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(
            Input::ListUpdated(list(&[
                (A, Status::Up, 1, "A"),
                (B, Status::Draining, 1, "A"),
                (C, Status::Down, 0, "A"),
            ])),
            t0,
        );
        m.handle(lost(A, LossCause::HeartbeatTimeout), t0);
        let actions = m.handle(
            Input::ListFailed {
                error: "timed out".into(),
            },
            t0,
        );
        // A just failed: B, draining but still a list server, is asked; then C, listed down but
        // known (a list can be stale: the client is never stranded while any server is up).
        assert_eq!(
            actions,
            vec![Action::FetchList(ListSource::Servers(vec![
                B.to_string(),
                C.to_string()
            ]))]
        );
        assert_eq!(
            m.state(),
            &State::FetchingList {
                from_service_address: false,
                fallback: false
            }
        );
        // The list B gives is used like any other.
        let actions = m.handle(fetched(list(&[(C, Status::Up, 0, "A")]), B), t0);
        assert_eq!(actions, vec![connect(C, false)]);
    }

    /// A machine connected to A whose last list is A, B and C, all UP with these users.
    fn connected_in_three(retry: RetryMode, seed: u64, users: [u64; 3], t0: Instant) -> Machine {
        let mut m = Machine::new(
            MachineConfig {
                retry,
                ..MachineConfig::default()
            },
            seed,
        );
        m.handle(Input::Start, t0);
        m.handle(fetched(only(A), A), t0);
        m.handle(connected(A), t0);
        m.handle(Input::ListUpdated(three_up(users)), t0);
        m
    }

    fn migrate_asked(server: &str, to: Option<&str>) -> Input {
        Input::MigrateAsked {
            server: server.to_string(),
            to: to.map(str::to_string),
            reason: "rebalance".to_string(),
        }
    }

    #[test]
    fn a_migration_connects_to_the_named_server_then_switches() {
        let t0 = Instant::now();
        let mut m = connected_in_three(RetryMode::RetryOnce, 1, [10, 0, 0], t0);
        let actions = m.handle(migrate_asked(A, Some(B)), t0);
        assert_eq!(
            actions,
            vec![Action::Migrate {
                server: B.to_string()
            }]
        );
        assert!(matches!(m.state(), State::Migrating { from, to, .. } if from == A && to == B));
        // A report about another server is stale.
        assert!(
            m.handle(Input::Migrated { server: C.into() }, t0)
                .is_empty()
        );
        let later = t0 + Duration::from_millis(40);
        let actions = m.handle(Input::Migrated { server: B.into() }, later);
        assert_eq!(
            actions,
            vec![Action::Notify(Notice::Migrated {
                from: A.into(),
                to: B.into(),
                reason: "rebalance".into(),
                took: Duration::from_millis(40),
            })]
        );
        assert_eq!(m.state(), &State::Connected { server: B.into() });
    }

    #[test]
    fn a_migration_without_a_target_follows_the_policy_without_the_old_server() {
        let t0 = Instant::now();
        for seed in 0..20 {
            let mut m = connected_in_three(RetryMode::RetryOnce, seed, [0, 5, 5], t0);
            let actions = m.handle(migrate_asked(A, None), t0);
            let [Action::Migrate { server }] = &actions[..] else {
                panic!("{actions:?}")
            };
            assert_ne!(server, A, "never back to the server that asked");
        }
        // Only the asking server known: nowhere to go, the client stays.
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        assert!(m.handle(migrate_asked(A, None), t0).is_empty());
        assert_eq!(m.state(), &State::Connected { server: A.into() });
    }

    #[test]
    fn a_failed_migration_stays_and_excludes_the_target() {
        let t0 = Instant::now();
        let mut m = connected_in_three(RetryMode::RetryOnce, 1, [10, 0, 0], t0);
        m.handle(migrate_asked(A, Some(B)), t0);
        let actions = m.handle(failed(B), t0);
        assert_eq!(
            actions,
            vec![Action::Notify(Notice::MigrationFailed {
                server: A.into(),
                to: B.into(),
                error: "refused".into(),
            })]
        );
        assert_eq!(m.state(), &State::Connected { server: A.into() });
        assert_eq!(m.excluded(t0), vec![B.to_string()]);
        // Asked again toward the excluded server: the policy picks another.
        let actions = m.handle(migrate_asked(A, Some(B)), t0);
        assert_eq!(
            actions,
            vec![Action::Migrate {
                server: C.to_string()
            }]
        );
    }

    #[test]
    fn losing_the_old_server_mid_migration_makes_the_migration_the_failover() {
        let t0 = Instant::now();
        let mut m = connected_in_three(RetryMode::RetryOnce, 1, [10, 0, 0], t0);
        m.handle(migrate_asked(A, Some(B)), t0);
        let cause = closed(close::RECONNECT_ELSEWHERE);
        let actions = m.handle(lost(A, cause.clone()), t0);
        assert_eq!(
            actions,
            vec![Action::Notify(Notice::Disconnected {
                server: A.into(),
                cause
            })]
        );
        assert_eq!(
            m.state(),
            &State::Connecting {
                server: B.into(),
                retry: false
            }
        );
        let later = t0 + Duration::from_millis(30);
        let actions = m.handle(connected(B), later);
        assert!(actions.contains(&Action::Notify(Notice::FailedOver {
            from: A.into(),
            to: B.into(),
            took: Duration::from_millis(30),
        })));
    }

    fn three_up(users: [u64; 3]) -> FarmList {
        list(&[
            (A, Status::Up, users[0], "A"),
            (B, Status::Up, users[1], "A"),
            (C, Status::Up, users[2], "A"),
        ])
    }

    /// The urls of the `Servers` fetch in `actions`.
    fn asked(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .find_map(|a| match a {
                Action::FetchList(ListSource::Servers(urls)) => Some(urls.clone()),
                _ => None,
            })
            .expect("a FetchList from servers")
    }

    #[test]
    fn failover_asks_the_pick_of_the_last_list_then_the_others_then_the_service_address() {
        let t0 = Instant::now();
        let mut m = connected_in_three(RetryMode::Immediate, 1, [100, 0, 0], t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        // A is excluded; B and C are both asked, the pick first; the service address is not.
        let mut urls = asked(&actions);
        assert_eq!(urls.len(), 2, "{urls:?}");
        urls.sort();
        assert_eq!(urls, vec![B.to_string(), C.to_string()]);
        assert_eq!(
            m.state(),
            &State::FetchingList {
                from_service_address: false,
                fallback: true
            }
        );
        // Neither answers: the service address is the fallback, A's addresses last.
        let actions = m.handle(Input::ListFailed { error: "x".into() }, t0);
        assert_eq!(actions, vec![fetch(&[A])]);
        assert_eq!(
            m.state(),
            &State::FetchingList {
                from_service_address: true,
                fallback: false
            }
        );
        // Nothing there either: the round is over.
        let actions = m.handle(Input::ListFailed { error: "y".into() }, t0);
        let (_, timer) = sleep_of(&actions);
        assert_eq!(m.state(), &State::Waiting { timer });
    }

    #[test]
    fn retry_once_then_asks_the_pick_of_the_last_list() {
        let t0 = Instant::now();
        let mut m = connected_in_three(RetryMode::RetryOnce, 2, [100, 0, 0], t0);
        let actions = m.handle(lost(A, LossCause::Broken("reset".into())), t0);
        assert_eq!(actions[1], retry_of(A));
        let actions = m.handle(failed(A), t0);
        let urls = asked(&actions);
        assert!(!urls.contains(&A.to_string()), "{urls:?}");
        assert_eq!(m.excluded(t0), vec![A.to_string()]);
    }

    #[test]
    fn the_pick_stands_while_its_fresh_list_still_has_it_as_a_candidate() {
        let t0 = Instant::now();
        for seed in 0..32 {
            let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 30, 10], t0);
            let actions = m.handle(lost(A, closed(1006)), t0);
            let pick = asked(&actions)[0].clone();
            // The pick's own list shows it far busier than the other (it counts its own new
            // users at once): it stays the pick, on the connection the list came over.
            let mut fresh = three_up([0, 0, 0]);
            fresh
                .servers
                .iter_mut()
                .find(|s| s.url == pick)
                .unwrap()
                .users = 900;
            let actions = m.handle(fetched(fresh, &pick), t0);
            assert_eq!(actions, vec![connect(&pick, true)], "seed {seed}");
            let actions = m.handle(connected(&pick), t0);
            assert!(!actions.contains(&Action::DropListConnection));
        }
    }

    #[test]
    fn the_pick_on_the_last_list_follows_the_policy() {
        // B 300 users, C 100, A lost: the weighted policy gives B (1 - 300/400) / 1 = 0.25.
        let t0 = Instant::now();
        let runs = 4000;
        let mut to_b = 0;
        for seed in 0..runs {
            let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 300, 100], t0);
            let actions = m.handle(lost(A, closed(1006)), t0);
            to_b += usize::from(asked(&actions)[0] == B);
        }
        let share_b = to_b as f64 / runs as f64;
        assert!((share_b - 0.25).abs() < 0.03, "B got {share_b}");
    }

    #[test]
    fn a_list_from_another_server_than_the_pick_is_selected_on_afresh() {
        let t0 = Instant::now();
        let mut chosen = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 0, 0], t0);
            let actions = m.handle(lost(A, closed(1006)), t0);
            let urls = asked(&actions);
            // The pick did not answer; the next server did, and its list still shows the pick.
            let actions = m.handle(fetched(three_up([0, 0, 0]), &urls[1]), t0);
            let [
                Action::Connect {
                    server,
                    reuse_list_connection,
                    ..
                },
            ] = &actions[..]
            else {
                panic!("seed {seed}: {actions:?}");
            };
            assert_ne!(server, A);
            assert_eq!(*reuse_list_connection, *server == urls[1], "seed {seed}");
            chosen.insert(server.clone());
        }
        // A fresh selection draws again: over the seeds both servers are chosen.
        assert_eq!(chosen.len(), 2);
    }

    #[test]
    fn the_pick_follows_the_fresh_list_when_it_is_no_longer_a_candidate() {
        let t0 = Instant::now();
        for seed in 0..16 {
            let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 0, 0], t0);
            let actions = m.handle(lost(A, closed(1006)), t0);
            let pick = asked(&actions)[0].clone();
            let other = if pick == B { C } else { B };
            // The server asked says it is draining: the other one is picked, the list
            // connection is dropped once the other is connected.
            let mut fresh = three_up([0, 0, 0]);
            fresh
                .servers
                .iter_mut()
                .find(|s| s.url == pick)
                .unwrap()
                .status = Status::Draining;
            let actions = m.handle(fetched(fresh, &pick), t0);
            assert_eq!(actions, vec![connect(other, false)], "seed {seed}");
            let actions = m.handle(connected(other), t0);
            assert_eq!(actions[0], Action::DropListConnection);
        }
    }

    #[test]
    fn the_pick_is_forgotten_when_it_gives_no_list() {
        let t0 = Instant::now();
        let mut moved = 0;
        for seed in 0..32 {
            let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 0, 0], t0);
            let actions = m.handle(lost(A, closed(1006)), t0);
            let pick = asked(&actions)[0].clone();
            // Neither the pick nor the other answered; the service address then reached the
            // pick after all. Its list is selected on afresh, where the pick weighs 0.25.
            m.handle(Input::ListFailed { error: "x".into() }, t0);
            let mut fresh = three_up([0, 100, 100]);
            fresh
                .servers
                .iter_mut()
                .find(|s| s.url == pick)
                .unwrap()
                .users = 301;
            let actions = m.handle(fetched(fresh, &pick), t0);
            let [
                Action::Connect {
                    server,
                    reuse_list_connection,
                    ..
                },
            ] = &actions[..]
            else {
                panic!("seed {seed}: {actions:?}");
            };
            assert_eq!(*reuse_list_connection, *server == pick, "seed {seed}");
            moved += usize::from(*server != pick);
        }
        assert!(moved > 0 && moved < 32, "{moved} of 32 moved");
    }

    #[test]
    fn unreachable_service_address_without_a_list_backs_off() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        let actions = m.handle(
            Input::ListFailed {
                error: "refused".into(),
            },
            t0,
        );
        let (_, timer) = sleep_of(&actions);
        assert_eq!(m.state(), &State::Waiting { timer });
    }

    #[test]
    fn no_list_from_the_other_servers_either_backs_off() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(
            Input::ListUpdated(list(&[(A, Status::Up, 1, "A"), (B, Status::Up, 1, "A")])),
            t0,
        );
        m.handle(lost(A, LossCause::Broken("reset".into())), t0);
        m.handle(Input::ListFailed { error: "x".into() }, t0);
        let actions = m.handle(Input::ListFailed { error: "y".into() }, t0);
        let (_, timer) = sleep_of(&actions);
        assert_eq!(m.state(), &State::Waiting { timer });
    }

    #[test]
    fn timer_starts_the_next_round_and_stale_timers_are_ignored() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        let actions = m.handle(Input::ListFailed { error: "x".into() }, t0);
        let (_, timer) = sleep_of(&actions);
        assert_eq!(m.handle(Input::TimerFired { timer: timer + 1 }, t0), vec![]);
        assert_eq!(m.state(), &State::Waiting { timer });
        assert_eq!(m.handle(Input::TimerFired { timer }, t0), vec![fetch(&[])]);
    }

    #[test]
    fn failed_connect_is_retried_once_then_excluded_and_the_next_round_backs_off() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        m.handle(fetched(only(B), C), t0);
        let actions = m.handle(failed(B), t0);
        assert_eq!(actions, vec![Action::DropListConnection, retry_of(B)]);
        assert_eq!(
            m.state(),
            &State::Connecting {
                server: B.to_string(),
                retry: true
            }
        );
        let actions = m.handle(failed(B), t0);
        assert!(matches!(
            &actions[..],
            [
                Action::Notify(Notice::Retrying { .. }),
                Action::Sleep { .. }
            ]
        ));
        assert_eq!(m.excluded(t0), vec![B.to_string()]);
    }

    #[test]
    fn a_server_refusing_with_an_elsewhere_code_is_not_retried() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        m.handle(fetched(only(B), C), t0);
        let actions = m.handle(
            Input::ConnectFailed {
                server: B.to_string(),
                error: "closed (4003) full".into(),
                elsewhere: true,
            },
            t0,
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Connect { .. })));
        assert_eq!(m.excluded(t0), vec![B.to_string()]);
    }

    #[test]
    fn retry_that_works_reports_a_failover_to_the_same_server() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        assert_eq!(
            actions,
            vec![
                Action::Notify(Notice::Disconnected {
                    server: A.to_string(),
                    cause: closed(1006)
                }),
                retry_of(A)
            ]
        );
        assert_eq!(
            m.state(),
            &State::Connecting {
                server: A.to_string(),
                retry: true
            }
        );
        let t1 = t0 + Duration::from_millis(40);
        let actions = m.handle(connected(A), t1);
        assert_eq!(
            actions[1],
            Action::Notify(Notice::FailedOver {
                from: A.to_string(),
                to: A.to_string(),
                took: Duration::from_millis(40)
            })
        );
    }

    #[test]
    fn lost_connection_whose_retry_fails_re_requests_the_list_at_once() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        m.handle(lost(A, LossCause::HeartbeatTimeout), t0);
        let actions = m.handle(failed(A), t0);
        // The first round after a good connection does not wait.
        assert_eq!(actions, vec![fetch(&[A])]);
        assert_eq!(m.excluded(t0), vec![A.to_string()]);
        // A is excluded: the new list's other server is picked even though A looks emptier.
        let actions = m.handle(
            fetched(
                list(&[(A, Status::Up, 0, "A"), (B, Status::Up, 100, "A")]),
                B,
            ),
            t0,
        );
        assert_eq!(actions, vec![connect(B, true)]);
        let t1 = t0 + Duration::from_millis(250);
        let actions = m.handle(connected(B), t1);
        assert!(actions.contains(&Action::Notify(Notice::FailedOver {
            from: A.to_string(),
            to: B.to_string(),
            took: Duration::from_millis(250)
        })));
    }

    #[test]
    fn immediate_mode_re_requests_at_once_without_retrying() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        assert_eq!(actions[1], fetch(&[A]));
        // A failed pick is not retried either.
        m.handle(fetched(list(&[(B, Status::Up, 0, "A")]), B), t0);
        let actions = m.handle(failed(B), t0);
        assert!(matches!(
            &actions[..],
            [
                Action::Notify(Notice::Retrying { .. }),
                Action::Sleep { .. }
            ]
        ));
    }

    #[test]
    fn reconnect_elsewhere_and_going_away_are_not_retried() {
        for code in [close::RECONNECT_ELSEWHERE, close::GOING_AWAY] {
            let t0 = Instant::now();
            let mut m = connected_to(A, RetryMode::RetryOnce, t0);
            let actions = m.handle(lost(A, closed(code)), t0);
            assert_eq!(actions[1], fetch(&[A]), "code {code}");
            assert_eq!(m.excluded(t0), vec![A.to_string()]);
        }
    }

    #[test]
    fn cool_down_ends() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(lost(A, closed(close::GOING_AWAY)), t0);
        let later = t0 + MachineConfig::default().cool_down;
        assert!(m.excluded(later).is_empty());
        // Within the cool-down, the list is asked of the service address (A last), and no one
        // else is known: the round ends.
        let actions = m.handle(
            Input::ListFailed {
                error: "refused".into(),
            },
            t0,
        );
        let (_, timer) = sleep_of(&actions);
        // The last list names A, no longer excluded: A itself is asked for a list.
        assert_eq!(
            m.handle(Input::TimerFired { timer }, later),
            vec![servers(&[A])]
        );
        assert_eq!(m.handle(fetched(only(A), A), later), vec![connect(A, true)]);
    }

    #[test]
    fn a_server_in_its_cool_down_is_chosen_when_the_list_has_no_other() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(lost(A, closed(1006)), t0);
        // A lone server that restarts answers the service address: it is taken at once, not
        // after the cool-down.
        assert_eq!(m.handle(fetched(only(A), A), t0), vec![connect(A, true)]);
        // With another candidate on the list, the excluded server is left out.
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(lost(A, closed(1006)), t0);
        let two = list(&[(A, Status::Up, 0, "A"), (B, Status::Up, 50, "A")]);
        assert_eq!(m.handle(fetched(two, A), t0), vec![connect(B, false)]);
        // A candidate of a less preferred group is taken before an excluded one of the best.
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(lost(A, closed(1006)), t0);
        let groups = list(&[(A, Status::Up, 0, "A"), (B, Status::Up, 50, "B")]);
        assert_eq!(m.handle(fetched(groups, A), t0), vec![connect(B, false)]);
        // Servers that are not up stay out even then.
        let mut m = connected_to(A, RetryMode::Immediate, t0);
        m.handle(lost(A, closed(1006)), t0);
        let down = list(&[(A, Status::Up, 0, "A"), (B, Status::Down, 0, "A")]);
        assert_eq!(m.handle(fetched(down, B), t0)[0], connect(A, false));
    }

    #[test]
    fn backoff_grows_with_failed_rounds_and_resets_on_connect() {
        let t0 = Instant::now();
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let mut m = Machine::new(
            MachineConfig {
                backoff,
                ..MachineConfig::default()
            },
            3,
        );
        m.handle(Input::Start, t0);
        for round in 0..6 {
            let actions = m.handle(Input::ListFailed { error: "x".into() }, t0);
            let (delay, timer) = sleep_of(&actions);
            assert!(delay < backoff.ceiling(round), "round {round}: {delay:?}");
            m.handle(Input::TimerFired { timer }, t0);
        }
        m.handle(fetched(only(A), A), t0);
        m.handle(connected(A), t0);
        m.handle(lost(A, closed(close::GOING_AWAY)), t0);
        // Back to the first round after the good connection: the re-request is immediate.
        assert_eq!(
            m.state(),
            &State::FetchingList {
                from_service_address: true,
                fallback: true
            }
        );
    }

    #[test]
    fn stop_closes_from_any_state_and_then_ignores_everything() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        assert_eq!(m.handle(Input::Stop, t0), vec![Action::Close]);
        assert_eq!(m.state(), &State::Stopped);
        assert_eq!(m.handle(Input::Start, t0), vec![]);
        assert_eq!(m.handle(lost(A, closed(1006)), t0), vec![]);

        // Stopping while a list connection is held drops it too.
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        m.handle(fetched(list(&[(B, Status::Up, 0, "A")]), A), t0);
        assert_eq!(
            m.handle(Input::Stop, t0),
            vec![Action::DropListConnection, Action::Close]
        );
    }

    #[test]
    fn list_updates_are_kept_in_any_state() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        let newer = list(&[(A, Status::Up, 5, "A"), (B, Status::Up, 3, "A")]);
        assert_eq!(m.handle(Input::ListUpdated(newer.clone()), t0), vec![]);
        assert_eq!(m.last_list(), Some(&newer));
        assert!(matches!(m.state(), State::Connected { .. }));
    }

    #[test]
    fn connected_carries_a_fresher_list() {
        let t0 = Instant::now();
        let mut m = machine(RetryMode::RetryOnce);
        m.handle(Input::Start, t0);
        m.handle(fetched(only(A), A), t0);
        let fresh = list(&[(A, Status::Up, 1, "A"), (B, Status::Up, 0, "A")]);
        m.handle(
            Input::Connected {
                server: A.to_string(),
                list: Some(fresh.clone()),
            },
            t0,
        );
        assert_eq!(m.last_list(), Some(&fresh));
    }

    #[test]
    fn reports_about_other_servers_or_states_are_ignored() {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        for input in [
            lost(B, closed(1006)),
            connected(B),
            failed(A),
            Input::ListFailed { error: "x".into() },
            fetched(only(B), B),
            Input::TimerFired { timer: 0 },
            Input::Start,
        ] {
            assert_eq!(m.handle(input.clone(), t0), vec![], "{input:?}");
            assert!(matches!(m.state(), State::Connected { .. }), "{input:?}");
        }
        let mut idle = machine(RetryMode::RetryOnce);
        assert_eq!(idle.handle(connected(A), t0), vec![]);
        assert_eq!(idle.state(), &State::Idle);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Inputs about servers A, B and C in any order, including nonsense for the state.
        fn input() -> impl Strategy<Value = Input> {
            let server = prop_oneof![Just(A), Just(B), Just(C)];
            let status = prop_oneof![Just(Status::Up), Just(Status::Down), Just(Status::Draining)];
            prop_oneof![
                Just(Input::Start),
                (server.clone(), status, server.clone()).prop_map(|(s, st, via)| fetched(
                    list(&[(s, st, 1, "A"), (B, Status::Up, 2, "B")]),
                    via
                )),
                Just(Input::ListFailed { error: "x".into() }),
                server.clone().prop_map(connected),
                (server.clone(), any::<bool>()).prop_map(|(s, elsewhere)| Input::ConnectFailed {
                    server: s.to_string(),
                    error: "x".into(),
                    elsewhere
                }),
                (
                    server,
                    prop_oneof![Just(1006u16), Just(4000), Just(1001), Just(4002)]
                )
                    .prop_map(|(s, code)| lost(s, closed(code))),
                (0u64..4).prop_map(|timer| Input::TimerFired { timer }),
                Just(Input::Stop),
            ]
        }

        proptest! {
            /// Whatever happens, the driver is never asked to run two things at once, never to
            /// drop a list connection it does not hold, and nothing follows a stop.
            #[test]
            fn the_machine_asks_for_one_thing_at_a_time(
                inputs in proptest::collection::vec((input(), 0u64..3000), 1..60),
                immediate in any::<bool>(),
            ) {
                let mut m = machine(if immediate { RetryMode::Immediate } else { RetryMode::RetryOnce });
                let t0 = Instant::now();
                let mut now = t0;
                let mut holding = false;
                for (input, step_ms) in inputs {
                    now += Duration::from_millis(step_ms);
                    let was_stopped = *m.state() == State::Stopped;
                    if matches!(input, Input::ListFetched { .. })
                        && matches!(m.state(), State::FetchingList { .. })
                    {
                        holding = true;
                    }
                    let actions = m.handle(input, now);
                    if was_stopped {
                        prop_assert!(actions.is_empty());
                    }
                    let started = actions
                        .iter()
                        .filter(|a| matches!(a, Action::FetchList(_) | Action::Connect { .. } | Action::Sleep { .. }))
                        .count();
                    prop_assert!(started <= 1, "{actions:?}");
                    for action in &actions {
                        match action {
                            Action::DropListConnection => {
                                prop_assert!(holding, "dropped a list connection not held");
                                holding = false;
                            }
                            Action::Connect { reuse_list_connection: true, .. } => {
                                prop_assert!(holding, "reused a list connection not held");
                                holding = false;
                            }
                            _ => {}
                        }
                    }
                    // Each waiting or working state was entered with the action that ends it.
                    let entered_with_its_action = match m.state() {
                        State::Waiting { timer } => actions
                            .iter()
                            .any(|a| matches!(a, Action::Sleep { timer: t, .. } if t == timer)),
                        State::FetchingList { .. } => {
                            actions.iter().any(|a| matches!(a, Action::FetchList(_)))
                        }
                        State::Connecting { server, .. } => actions
                            .iter()
                            .any(|a| matches!(a, Action::Connect { server: s, .. } if s == server)),
                        _ => true,
                    };
                    prop_assert!(started == 0 || entered_with_its_action, "{actions:?}");
                }
            }
        }
    }

    #[test]
    fn loss_causes_say_whether_to_go_elsewhere() {
        assert!(closed(close::RECONNECT_ELSEWHERE).sends_elsewhere());
        assert!(closed(close::GOING_AWAY).sends_elsewhere());
        assert!(closed(close::SERVER_FULL).sends_elsewhere());
        assert!(closed(close::POLICY_VIOLATION).sends_elsewhere());
        assert!(!closed(close::HEARTBEAT_TIMEOUT).sends_elsewhere());
        assert!(!closed(close::SLOW_CONSUMER).sends_elsewhere());
        assert!(!LossCause::HeartbeatTimeout.sends_elsewhere());
        assert_eq!(closed(4000).to_string(), "closed (4000)");
    }
}
