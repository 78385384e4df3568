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
mod tests;
