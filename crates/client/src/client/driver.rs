//! The client's task: it feeds what happens on the network to the [`Machine`] and carries out
//! the actions it returns; it also keeps the heartbeats, delivers messages, hands a migration's
//! new connection over once the old one caught up, refreshes the token, and turns the machine's
//! notices into [`Event`]s for the application.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use rand::Rng;
use rand::rngs::StdRng;
use streamfarm_core::FarmList;
use streamfarm_core::protocol::{ClientFrame, Encoding, Position, ServerFrame};
use streamfarm_core::time::unix_ms;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use super::dial::{self, Ahead, Done, Subscribed, Way};
use super::{Command, DialCounters, Event};
use crate::address::{Resolver, ServiceAddress};
use crate::connection::{self, Conn, Dialer, Incoming};
use crate::error::Error;
use crate::machine::{Action, Input, ListSource, LossCause, Machine, Notice, State};
use crate::options::ClientOptions;
use crate::token::{self, TokenFuture};
use crate::topics::{TopicNotice, Topics};
use crate::transport::{Transport, TransportChoice};

type Operation = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The established connection and its heartbeat bookkeeping.
struct Live {
    conn: Conn,
    server: String,
    last_received: Instant,
    last_sent: Instant,
    interval: Duration,
    timeout: Duration,
    /// The list is asked for again, in place of a ping, when older than this.
    list_refresh: Option<Duration>,
    /// When the last list arrived on this connection.
    list_at: Instant,
    /// When to send the node a fresh token (`refresh`), when the client has a token source and
    /// its token an expiry.
    refresh_at: Option<Instant>,
    /// Fires at the earliest of the heartbeat deadline and the next ping, as they stood when it
    /// was set; it is set again only when it fires. Moving it on every frame would register and
    /// remove a timer per message, which at thousands of messages a second was a large share of
    /// a client's work.
    heartbeat: Pin<Box<Sleep>>,
}

impl Live {
    /// When the heartbeat timer should fire next: the deadline for hearing from the server or
    /// the time of the next ping, whichever comes first.
    fn next_heartbeat(&self) -> Instant {
        (self.last_received + self.timeout).min(self.last_sent + self.interval)
    }
}

/// What the established connection's events mean for the machine.
enum LiveOutcome {
    /// The connection is over.
    Lost(LossCause),
    /// The server asked the client to move.
    Migrate { to: Option<String>, reason: String },
}

/// What happened on the established connection.
enum LiveEvent {
    Message(Option<Result<tokio_tungstenite::tungstenite::Message, String>>),
    TimedOut,
    SendFailed(String),
}

/// A migration's new connection once subscribed, until it takes over from the old one.
struct Arriving {
    /// What it sent since subscribing (`subscribed` first), delivered once it takes over.
    buffer: Vec<ServerFrame>,
    /// Per topic, the position it starts its live delivery after: once the old connection has
    /// delivered up to there, the new one has everything after it.
    until: BTreeMap<String, Position>,
    /// It takes over by then, caught up or not (its `subscribed` positions then recover
    /// whatever the old connection did not deliver).
    deadline: Instant,
}

/// Longest a migration waits for the old connection to catch up with the new one.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Most frames a migration's new connection holds back while the old one catches up.
const MAX_ARRIVING_FRAMES: usize = 65_536;

/// Whether the client already has everything up to `until`, the new connection's start.
#[derive(Debug, PartialEq, Eq)]
enum CatchUp {
    Done,
    Waiting,
    /// A topic moved to another epoch: the old connection will never get there.
    Never,
}

fn catch_up(topics: &Topics, until: &BTreeMap<String, Position>) -> CatchUp {
    let mut state = CatchUp::Done;
    for (topic, start) in until {
        if !topics.contains(topic) || start.offset == 0 {
            continue;
        }
        match topics.position(topic) {
            Some(held) if held.epoch != start.epoch => return CatchUp::Never,
            Some(held) if held.offset >= start.offset => {}
            _ => state = CatchUp::Waiting,
        }
    }
    state
}

/// What the driver's loop holds between turns, besides the machine: the actions still to carry
/// out, the one network operation in flight, the timer, the connections and the token refresh.
struct RunState {
    actions: VecDeque<Action>,
    operation: Option<Operation>,
    timer: Option<(u64, Pin<Box<Sleep>>)>,
    /// The connection the last list came over, until the machine reuses or drops it.
    list_conn: Option<Conn>,
    live: Option<Live>,
    /// Messages that arrived while subscribing, delivered once `Connected` is out.
    backlog: Vec<ServerFrame>,
    /// The backlog is a new connection's: its server says in it if its feed is partial.
    greeted: bool,
    /// A migration's new connection, subscribed, while the old one catches up with it.
    arriving_live: Option<Live>,
    arriving: Option<Arriving>,
    /// A fresh token being fetched for the live connection.
    refreshing: Option<TokenFuture>,
}

impl RunState {
    fn new(actions: Vec<Action>) -> Self {
        RunState {
            actions: actions.into(),
            operation: None,
            timer: None,
            list_conn: None,
            live: None,
            backlog: Vec::new(),
            greeted: false,
            arriving_live: None,
            arriving: None,
            refreshing: None,
        }
    }
}

/// Whether carrying out the actions closed the client.
#[derive(Debug, PartialEq, Eq)]
enum Carried {
    All,
    Closed,
}

pub(super) struct Driver {
    pub(super) machine: Machine,
    pub(super) dials: Arc<DialCounters>,
    pub(super) rng: StdRng,
    pub(super) resolver: Resolver,
    pub(super) address: ServiceAddress,
    pub(super) options: ClientOptions,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) server: watch::Sender<Option<String>>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    /// The application was last told the feed is partial (`Event::Feed`).
    pub(super) feed_partial: bool,
    /// Which transport the next connection tries.
    pub(super) transport: TransportChoice,
    /// The transport of the live connection.
    pub(super) in_use: Transport,
}

impl Driver {
    /// How the next connection is opened: the options', by the transport choice.
    fn dialer(&self) -> Dialer {
        let mut dialer = self.options.dialer();
        dialer.plan = self.transport.plan();
        dialer
    }

    /// Runs the client until the machine closes it: each turn hands a caught-up migration over,
    /// carries out the machine's actions, delivers what a new connection brought, then waits for
    /// the next thing to happen and feeds it to the machine.
    pub(super) async fn run(mut self) {
        let mut run = RunState::new(self.machine.handle(Input::Start, now_std()));
        loop {
            if self.take_over_when_caught_up(&mut run) {
                continue;
            }
            if self.carry_out(&mut run).await == Carried::Closed {
                return;
            }
            if self.deliver_backlog(&mut run).await {
                continue;
            }
            if let Some(input) = self.next_input(&mut run).await {
                run.actions.extend(self.machine.handle(input, now_std()));
            }
        }
    }

    /// The migration's new connection takes over once the old one caught up with it (or at its
    /// deadline, or when the old one is gone). True when it did.
    fn take_over_when_caught_up(&mut self, run: &mut RunState) -> bool {
        let Some(pending) = &run.arriving else {
            return false;
        };
        let state = catch_up(self.machine.topics(), &pending.until);
        let overdue = Instant::now() >= pending.deadline
            || pending.buffer.len() >= MAX_ARRIVING_FRAMES
            || run.live.is_none()
            // The old server's feed is partial (it is cut off): it will not catch up, and the
            // new connection recovers from the positions held.
            || self.feed_partial;
        if state == CatchUp::Waiting && !overdue {
            return false;
        }
        let pending = run.arriving.take().expect("checked above");
        let Some(new) = run.arriving_live.take() else {
            return false;
        };
        let server = new.server.clone();
        self.in_use = new.conn.channel.transport();
        run.refreshing = None;
        if let Some(old) = run.live.replace(new) {
            tokio::spawn(connection::close(old.conn.channel));
        }
        // Caught up: the new connection's `subscribed` has nothing to recover.
        let caught_up = state == CatchUp::Done;
        run.backlog.extend(
            pending
                .buffer
                .into_iter()
                .filter(|frame| !(caught_up && matches!(frame, ServerFrame::Subscribed { .. }))),
        );
        run.greeted = true;
        run.actions
            .extend(self.machine.handle(Input::Migrated { server }, now_std()));
        true
    }

    /// Carries out the machine's actions, and those it returns meanwhile, until none is left
    /// or one closes the client.
    async fn carry_out(&mut self, run: &mut RunState) -> Carried {
        while let Some(action) = run.actions.pop_front() {
            match action {
                Action::FetchList(source) => {
                    let seed = self.rng.random();
                    // The pick of the last list, asked first, is kept by nearly every failover:
                    // subscribe on it at once (a client with no topics has nothing to gain).
                    let ahead = match (&source, self.machine.asked()) {
                        (ListSource::Servers(urls), Some(pick))
                            if urls.first().is_some_and(|u| u == pick)
                                && !self.machine.topics().is_empty() =>
                        {
                            Some(Ahead {
                                server: pick.to_string(),
                                topics: self.machine.topics().clone(),
                            })
                        }
                        _ => None,
                    };
                    run.operation = Some(Box::pin(dial::fetch_list(
                        self.dials.clone(),
                        self.address.clone(),
                        self.resolver.clone(),
                        source,
                        self.dialer(),
                        self.options.connect_timeout,
                        seed,
                        ahead,
                    )));
                }
                Action::Connect {
                    server,
                    reuse_list_connection,
                    retry,
                } => {
                    let reused = if reuse_list_connection {
                        run.list_conn.take()
                    } else {
                        None
                    };
                    let way = reused.map_or(Way::Dial, |conn| Way::ListConnection(Box::new(conn)));
                    run.operation = Some(Box::pin(dial::connect(
                        self.dials.clone(),
                        server,
                        way,
                        self.machine.topics().clone(),
                        self.resolver.clone(),
                        self.dialer(),
                        if retry {
                            self.options.retry_timeout.min(self.options.connect_timeout)
                        } else {
                            self.options.connect_timeout
                        },
                    )));
                }
                Action::Migrate { server } => {
                    run.operation = Some(Box::pin(dial::connect(
                        self.dials.clone(),
                        server,
                        Way::Migration,
                        self.machine.topics().clone(),
                        self.resolver.clone(),
                        self.dialer(),
                        self.options.connect_timeout,
                    )));
                }
                Action::DropListConnection => {
                    if let Some(conn) = run.list_conn.take() {
                        tokio::spawn(connection::close(conn.channel));
                    }
                }
                Action::Sleep { delay, timer: id } => {
                    run.timer = Some((id, Box::pin(tokio::time::sleep(delay))));
                }
                Action::Notify(notice) => {
                    if !self.notify(notice).await {
                        run.actions
                            .extend(self.machine.handle(Input::Stop, now_std()));
                    }
                }
                Action::Close => {
                    self.server.send_replace(None);
                    if let Some(arriving) = run.arriving_live.take() {
                        tokio::spawn(connection::close(arriving.conn.channel));
                    }
                    if let Some(live) = run.live.take() {
                        connection::close(live.conn.channel).await;
                    }
                    return Carried::Closed;
                }
            }
        }
        Carried::All
    }

    /// Delivers what a new connection brought (its `feed`, `subscribed` and early messages) once
    /// the application was told it is connected. True when that gave the machine something to
    /// do (the application stopped listening).
    async fn deliver_backlog(&mut self, run: &mut RunState) -> bool {
        let Some(live) = &run.live else {
            return false;
        };
        // A server sends `feed` on a new connection only while its feed is partial: one that
        // does not, after a partial one, means the feed is whole again.
        if std::mem::take(&mut run.greeted)
            && self.feed_partial
            && !run
                .backlog
                .iter()
                .any(|f| matches!(f, ServerFrame::Feed { complete: false }))
        {
            self.feed_partial = false;
            let whole = Event::Feed {
                server: live.server.clone(),
                complete: true,
            };
            if !self.tell(whole).await {
                run.actions
                    .extend(self.machine.handle(Input::Stop, now_std()));
            }
        }
        for frame in std::mem::take(&mut run.backlog) {
            if !self.deliver(frame, &live.server).await {
                run.actions
                    .extend(self.machine.handle(Input::Stop, now_std()));
            }
        }
        !run.actions.is_empty()
    }

    /// Waits for the next thing to happen: a command, the operation in flight, the timer, the
    /// token refresh, or a frame on either connection. Returns the machine's input, or `None`
    /// when it was handled here.
    async fn next_input(&mut self, run: &mut RunState) -> Option<Input> {
        let refresh_at = run.live.as_ref().and_then(|l| l.refresh_at);
        tokio::select! {
            command = self.commands.recv() => self.on_command(run, command).await,
            done = run_operation(&mut run.operation) => {
                run.operation = None;
                self.on_done(run, done).await
            },
            id = run_timer(&mut run.timer) => {
                run.timer = None;
                Some(Input::TimerFired { timer: id })
            },
            () = refresh_due(refresh_at), if run.refreshing.is_none() => {
                if let (Some(live), Some(source)) = (&mut run.live, &self.options.token) {
                    live.refresh_at = None;
                    run.refreshing = Some(source.fetch());
                }
                None
            },
            fetched = run_refresh(&mut run.refreshing) => {
                run.refreshing = None;
                on_refreshed(&mut run.live, fetched).await;
                None
            },
            event = watch_live(&mut run.live) => {
                let server = run.live.as_ref().map(|l| l.server.clone()).unwrap_or_default();
                match self.on_live_event(event, &mut run.live).await? {
                    LiveOutcome::Lost(cause) => {
                        // The connection is over whatever the machine decides: drop it.
                        run.live = None;
                        // A failover: the next connection tries a WebSocket again.
                        self.transport.failover();
                        // A migration's new connection, if one is up, takes over now.
                        run.arriving.is_none().then_some(Input::Lost { server, cause })
                    }
                    LiveOutcome::Migrate { to, reason } => {
                        Some(Input::MigrateAsked { server, to, reason })
                    }
                }
            },
            event = watch_live(&mut run.arriving_live) => {
                let server = run.arriving_live.as_ref().map(|l| l.server.clone()).unwrap_or_default();
                let error = self
                    .on_arriving_event(event, &mut run.arriving_live, run.arriving.as_mut())
                    .await?;
                run.arriving_live = None;
                run.arriving = None;
                Some(Input::ConnectFailed { server, error, elsewhere: false })
            },
        }
    }

    /// A command of the application: stop, or change the topics (sent on both connections).
    async fn on_command(&mut self, run: &mut RunState, command: Option<Command>) -> Option<Input> {
        match command {
            None | Some(Command::Stop) => return Some(Input::Stop),
            Some(Command::Subscribe(topics)) => {
                let topics = self.machine.topics_mut().subscribe(topics);
                if !topics.is_empty() {
                    let sub = ClientFrame::Sub {
                        topics,
                        positions: BTreeMap::new(),
                    };
                    send_on(&mut run.arriving_live, sub.clone()).await;
                    send_on(&mut run.live, sub).await;
                }
            }
            Some(Command::Unsubscribe(topics)) => {
                let topics = self.machine.topics_mut().unsubscribe(topics);
                if !topics.is_empty() {
                    let unsub = ClientFrame::Unsub { topics };
                    send_on(&mut run.arriving_live, unsub.clone()).await;
                    send_on(&mut run.live, unsub).await;
                }
            }
        }
        None
    }

    /// The network operation in flight is done: a list fetched (its connection kept for the
    /// machine to reuse), a connection subscribed, or either failed.
    async fn on_done(&mut self, run: &mut RunState, done: Done) -> Option<Input> {
        match done {
            Done::List(Ok(conn)) => {
                self.transport.opened(conn.channel.transport());
                let input = Input::ListFetched {
                    age: list_age(&conn.list),
                    list: conn.list.clone(),
                    via: conn.hello.url.clone(),
                };
                run.list_conn = Some(conn);
                Some(input)
            }
            Done::List(Err(err)) => {
                self.tell_rejection(&err).await;
                Some(Input::ListFailed {
                    error: err.to_string(),
                })
            }
            Done::Connect {
                server,
                result: Ok(subscribed),
            } => self.on_subscribed(run, server, subscribed).await,
            Done::Connect {
                server,
                result: Err(err),
            } => {
                // A migration that fails leaves the client connected where it was
                // (`MigrationFailed`): nothing an application should stop for.
                if !matches!(self.machine.state(), State::Migrating { .. }) {
                    self.tell_rejection(&err).await;
                }
                Some(Input::ConnectFailed {
                    server,
                    elsewhere: err.sends_elsewhere(),
                    error: err.to_string(),
                })
            }
        }
    }

    /// A connection to `server` is subscribed: it becomes the live one, or, for a migration, the
    /// arriving one until the old connection has caught up with it.
    async fn on_subscribed(
        &mut self,
        run: &mut RunState,
        server: String,
        Subscribed {
            conn,
            topics,
            early,
        }: Subscribed,
    ) -> Option<Input> {
        self.transport.opened(conn.channel.transport());
        let list = Some(conn.list.clone());
        let migrating = matches!(
            self.machine.state(),
            State::Migrating { to, .. } if *to == server
        );
        let conn_transport = conn.channel.transport();
        let mut new = Some(self.live(conn, server.clone()));
        // The application may have changed its topics while this connection was being made.
        let now_topics = self.machine.topics();
        let added: Vec<String> = now_topics
            .names()
            .into_iter()
            .filter(|t| !topics.contains(t))
            .collect();
        let removed: Vec<String> = topics
            .into_iter()
            .filter(|t| !now_topics.contains(t))
            .collect();
        if !added.is_empty() {
            let sub = ClientFrame::Sub {
                topics: added,
                positions: BTreeMap::new(),
            };
            send_on(&mut new, sub).await;
        }
        if !removed.is_empty() {
            send_on(&mut new, ClientFrame::Unsub { topics: removed }).await;
        }
        if migrating {
            // Make-before-break: the old connection keeps delivering until it has caught up
            // with where this one starts.
            let until = early
                .iter()
                .filter_map(|frame| match frame {
                    ServerFrame::Subscribed { positions, .. } => Some(positions.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            run.arriving_live = new;
            run.arriving = Some(Arriving {
                buffer: early,
                until,
                deadline: Instant::now() + CATCH_UP,
            });
            if let Some(list) = list {
                self.list_updated(list);
            }
            return None;
        }
        // The old connection's token refresh, if one was under way, is moot.
        run.refreshing = None;
        self.in_use = conn_transport;
        run.live = new;
        run.backlog = early;
        run.greeted = true;
        Some(Input::Connected { server, list })
    }

    /// A new `Live` over `conn` to `server`, its heartbeats starting now.
    fn live(&self, conn: Conn, server: String) -> Live {
        let now = Instant::now();
        let timeout = self
            .options
            .heartbeat_timeout
            .unwrap_or(conn.hello.heartbeat_timeout);
        let refresh_at = conn
            .token_exp
            .filter(|_| self.options.token.is_some())
            .map(|exp| now + token::refresh_in(exp));
        let interval = conn.hello.heartbeat_interval;
        Live {
            refresh_at,
            interval,
            timeout,
            list_refresh: self.options.list_refresh,
            list_at: now,
            conn,
            server,
            last_received: now,
            last_sent: now,
            heartbeat: Box::pin(tokio::time::sleep_until(now + timeout.min(interval))),
        }
    }

    /// Handles what a migration's new connection produced before it took over: frames are held
    /// back in `arriving`; returns what went wrong when the connection is over.
    async fn on_arriving_event(
        &mut self,
        event: LiveEvent,
        conn: &mut Option<Live>,
        arriving: Option<&mut Arriving>,
    ) -> Option<String> {
        let message = match event {
            LiveEvent::TimedOut => return Some("heartbeat timeout".to_string()),
            LiveEvent::SendFailed(err) | LiveEvent::Message(Some(Err(err))) => return Some(err),
            LiveEvent::Message(None) => return Some("connection ended".to_string()),
            LiveEvent::Message(Some(Ok(message))) => message,
        };
        match connection::decode(message) {
            Incoming::Closed { code, reason } => {
                return Some(LossCause::Closed { code, reason }.to_string());
            }
            Incoming::Frame(ServerFrame::Ping { id }) => {
                send_on(conn, ClientFrame::Pong { id }).await;
            }
            Incoming::Frame(ServerFrame::Farm(list)) => self.list_updated(list),
            // A request to move again waits until this connection has taken over.
            Incoming::Frame(ServerFrame::Migrate { .. }) => {}
            Incoming::Frame(frame) => {
                if let Some(arriving) = arriving {
                    arriving.buffer.push(frame);
                }
            }
            Incoming::Nothing | Incoming::Invalid(_) => {}
        }
        None
    }

    /// Handles what the live connection produced: the end of the connection, or a request to
    /// move, for the machine.
    async fn on_live_event(
        &mut self,
        event: LiveEvent,
        live: &mut Option<Live>,
    ) -> Option<LiveOutcome> {
        let lost = |cause| Some(LiveOutcome::Lost(cause));
        let message = match event {
            LiveEvent::TimedOut => return lost(LossCause::HeartbeatTimeout),
            LiveEvent::SendFailed(err) => return lost(LossCause::Broken(err)),
            LiveEvent::Message(None) => {
                return lost(LossCause::Broken("connection ended".to_string()));
            }
            LiveEvent::Message(Some(Err(err))) => return lost(LossCause::Broken(err)),
            LiveEvent::Message(Some(Ok(message))) => message,
        };
        let server = live.as_ref()?.server.clone();
        match connection::decode(message) {
            Incoming::Closed { code, reason } => return lost(LossCause::Closed { code, reason }),
            Incoming::Frame(ServerFrame::Migrate { to, reason, .. }) => {
                return Some(LiveOutcome::Migrate { to, reason });
            }
            Incoming::Nothing => {}
            Incoming::Invalid(detail) => warn!(server = %server, %detail, "ignored a frame"),
            Incoming::Frame(ServerFrame::Ping { id }) => {
                send_on(live, ClientFrame::Pong { id }).await;
            }
            Incoming::Frame(ServerFrame::Farm(list)) => {
                if let Some(live) = live.as_mut() {
                    live.list_at = Instant::now();
                }
                self.list_updated(list);
            }
            Incoming::Frame(frame) => {
                if !self.deliver(frame, &server).await {
                    // The application is gone: the closed command channel reads as a stop.
                    self.commands.close();
                }
            }
        }
        None
    }

    fn list_updated(&mut self, list: FarmList) {
        // A list update never produces actions: the machine only keeps it.
        let actions = self.machine.handle(Input::ListUpdated(list), now_std());
        debug_assert!(actions.is_empty());
    }

    /// Turns a data frame into events; false when the application is gone.
    async fn deliver(&mut self, frame: ServerFrame, server: &str) -> bool {
        let position = frame.position();
        let event = match frame {
            ServerFrame::Msg {
                topic,
                data,
                encoding,
                ..
            } => {
                let verdict = self.machine.topics_mut().on_message(&topic, position);
                if !verdict.deliver {
                    return true;
                }
                let payload = match encoding {
                    Encoding::Utf8 => data.into_bytes(),
                    Encoding::Base64 => {
                        match base64::engine::general_purpose::STANDARD.decode(data.as_bytes()) {
                            Ok(bytes) => bytes,
                            Err(err) => {
                                warn!(server = %server, %topic, %err, "dropped a message with bad base64");
                                return true;
                            }
                        }
                    }
                };
                let message = Event::Message {
                    topic,
                    payload,
                    position,
                };
                // A gap comes before the message that follows it; a recovery after the message
                // that completes it.
                return match verdict.notice {
                    Some(notice @ TopicNotice::Gap { .. }) => {
                        self.tell(notice_event(notice)).await && self.tell(message).await
                    }
                    Some(notice) => {
                        self.tell(message).await && self.tell(notice_event(notice)).await
                    }
                    None => self.tell(message).await,
                };
            }
            ServerFrame::Subscribed { positions, .. } => {
                let notices = self.machine.topics_mut().on_subscribed(&positions);
                return self.tell_all(notices).await;
            }
            ServerFrame::Gap {
                topic,
                epoch,
                from,
                to,
                reason,
            } => {
                let notices = self
                    .machine
                    .topics_mut()
                    .on_gap(&topic, epoch, from, to, reason);
                return self.tell_all(notices).await;
            }
            ServerFrame::Feed { complete } => {
                self.feed_partial = !complete;
                Event::Feed {
                    server: server.to_string(),
                    complete,
                }
            }
            ServerFrame::Error { code, message } => Event::ServerError {
                server: server.to_string(),
                code,
                message,
            },
            _ => return true,
        };
        self.tell(event).await
    }

    /// Gives the application an event; false when it is gone.
    async fn tell(&mut self, event: Event) -> bool {
        self.events.send(event).await.is_ok()
    }

    /// Tells the application of a failure that retrying meets again ([`Event::Rejected`]),
    /// before the machine retries. An application that is gone is seen at the next event.
    async fn tell_rejection(&mut self, err: &Error) {
        if let Some(rejection) = err.rejection() {
            // The server that rejected the client, rather than "no server answered".
            let error = match err {
                Error::Unreachable { last, .. } => last.to_string(),
                other => other.to_string(),
            };
            self.tell(Event::Rejected { rejection, error }).await;
        }
    }

    async fn tell_all(&mut self, notices: Vec<TopicNotice>) -> bool {
        for notice in notices {
            if !self.tell(notice_event(notice)).await {
                return false;
            }
        }
        true
    }

    /// Tells the application; false when it is gone.
    async fn notify(&mut self, notice: Notice) -> bool {
        let events = match notice {
            Notice::Connected { server } => {
                let transport = self.in_use;
                debug!(server = %server, %transport, "connected");
                self.server.send_replace(Some(server.clone()));
                vec![Event::Connected { server, transport }]
            }
            Notice::Disconnected { server, cause } => {
                debug!(server = %server, %cause, "disconnected");
                self.server.send_replace(None);
                vec![Event::Disconnected { server, cause }]
            }
            Notice::FailedOver { from, to, took } => {
                debug!(from = %from, to = %to, ?took, "failed over");
                vec![Event::FailedOver { from, to, took }]
            }
            Notice::Migrated {
                from,
                to,
                reason,
                took,
            } => {
                let transport = self.in_use;
                debug!(from = %from, to = %to, %reason, ?took, %transport, "migrated");
                self.server.send_replace(Some(to.clone()));
                vec![Event::Migrated {
                    from,
                    to,
                    reason,
                    took,
                    transport,
                }]
            }
            Notice::MigrationFailed { server, to, error } => {
                debug!(server = %server, to = %to, %error, "migration failed");
                vec![Event::MigrationFailed { server, to, error }]
            }
            Notice::Retrying { reason, delay } => {
                debug!(%reason, ?delay, "retrying");
                vec![Event::Retrying { reason, delay }]
            }
        };
        for event in events {
            if self.events.send(event).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A notice of the topics' positions as an event.
fn notice_event(notice: TopicNotice) -> Event {
    match notice {
        TopicNotice::Recovered { topic, count } => Event::Recovered { topic, count },
        TopicNotice::Gap {
            topic,
            epoch,
            from,
            to,
            reason,
        } => Event::Gap {
            topic,
            epoch,
            from,
            to,
            reason,
        },
    }
}

/// How old a list is by the wall clock, from its `generated_at_ms` (zero when it has none, or
/// when clocks disagree the other way).
fn list_age(list: &FarmList) -> Duration {
    let Some(generated) = list.generated_at_ms else {
        return Duration::ZERO;
    };
    Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(generated))
}

/// The machine's clock: tokio's, so that tests with paused time drive it too.
fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

async fn run_operation(operation: &mut Option<Operation>) -> Done {
    match operation {
        Some(op) => op.await,
        None => std::future::pending().await,
    }
}

/// How long the client waits before asking its token provider again after it failed.
const TOKEN_RETRY: Duration = Duration::from_secs(1);

/// Fires when the live connection's token is due for a refresh.
async fn refresh_due(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn run_refresh(refreshing: &mut Option<TokenFuture>) -> Result<String, String> {
    match refreshing {
        Some(fetch) => fetch.await,
        None => std::future::pending().await,
    }
}

/// A token fetch is done: the fresh token goes to the live connection's node, and its next
/// refresh is set from its expiry; a failed fetch is tried again in [`TOKEN_RETRY`].
async fn on_refreshed(live: &mut Option<Live>, fetched: Result<String, String>) {
    match fetched {
        Ok(token) => {
            if let Some(live) = live {
                live.refresh_at =
                    token::expiry(&token).map(|exp| Instant::now() + token::refresh_in(exp));
                debug!(server = %live.server, "refreshing the token");
            }
            send_on(live, ClientFrame::Refresh { token }).await;
        }
        Err(err) => {
            warn!(%err, "no fresh token; trying again in a second");
            if let Some(live) = live {
                live.refresh_at = Some(Instant::now() + TOKEN_RETRY);
            }
        }
    }
}

async fn run_timer(timer: &mut Option<(u64, Pin<Box<Sleep>>)>) -> u64 {
    match timer {
        Some((id, sleep)) => {
            sleep.await;
            *id
        }
        None => std::future::pending().await,
    }
}

/// Waits for the next thing on the live connection, sending heartbeats meanwhile.
async fn watch_live(live: &mut Option<Live>) -> LiveEvent {
    let Some(live) = live else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            message = live.conn.channel.next() => {
                live.last_received = Instant::now();
                return LiveEvent::Message(message.map(|m| m.map_err(|e| e.to_string())));
            }
            () = &mut live.heartbeat => {
                let now = Instant::now();
                if now >= live.last_received + live.timeout {
                    return LiveEvent::TimedOut;
                }
                if now < live.last_sent + live.interval {
                    // Early: something was received or sent since the timer was set.
                    let next = live.next_heartbeat();
                    live.heartbeat.as_mut().reset(next);
                    continue;
                }
                live.last_sent = now;
                let next = live.next_heartbeat();
                live.heartbeat.as_mut().reset(next);
                // A list request is answered like a ping, with the list instead of a pong. Asked
                // with `watch`, as the connection watches the list already: the answer of a
                // client that has chosen takes none of the list server's draws, and the watch
                // stays on.
                let list_due = live.list_refresh.is_some_and(|every| now >= live.list_at + every);
                let frame = if list_due {
                    ClientFrame::List { watch: true, users: false }
                } else {
                    ClientFrame::Ping { id: None }
                };
                if let Err(err) = connection::send(&mut live.conn.channel, &frame).await {
                    return LiveEvent::SendFailed(err.to_string());
                }
            }
        }
    }
}

/// Sends a frame on the live connection, if there is one. A failure shows up as a broken
/// connection on the next read, so it is only logged here.
async fn send_on(live: &mut Option<Live>, frame: ClientFrame) {
    if let Some(live) = live {
        live.last_sent = Instant::now();
        if let Err(err) = connection::send(&mut live.conn.channel, &frame).await {
            debug!(server = %live.server, %err, "send failed");
        }
    }
}
