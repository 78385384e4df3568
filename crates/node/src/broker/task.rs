//! The broker's task on a node: the handle sessions, HTTP and the relay call ([`Broker`],
//! [`BrokerInput`]), and the tokio task that feeds the [`Core`] its inputs — frames, publishes,
//! the farm list, membership, ended links and the time — and sends its frames over the relay.

use super::*;

/// Depth of the broker task's input queue: sessions and relay links wait when it is full.
const INPUT_QUEUE: usize = 4096;

/// The broker's handle: what sessions, HTTP and the relay call.
pub(crate) struct Broker {
    pub(crate) hub: Arc<Hub>,
    relay: Arc<dyn Relay>,
    input: mpsc::Sender<Input>,
    publish_timeout: Duration,
}

/// The node's [`Network`]: frames as JSON text over the relay.
struct RelayNetwork(Arc<dyn Relay>);

/// The broker task: wires the core to its inbox, a ticking timer, the farm list, membership's
/// peers and the relay's ended links, until `cancel`.
async fn drive(
    mut core: Core,
    mut input: mpsc::Receiver<Input>,
    mut farm: watch::Receiver<FarmList>,
    mut peers: watch::Receiver<crate::relay::Peers>,
    link_ends: Arc<crate::relay::LinkEnds>,
    cancel: CancellationToken,
) {
    let peers_input = |peers: &crate::relay::Peers| Input::Peers {
        settled: peers.settled,
        known: peers.relays.keys().cloned().collect(),
    };
    let mut link_changes = link_ends.watch();
    core.handle(
        Now::clocks(),
        Input::Farm(live_nodes(&farm.borrow_and_update())),
    );
    core.handle(Now::clocks(), peers_input(&peers.borrow_and_update()));
    core.handle(Now::clocks(), Input::LinksEnded(link_ends.ended_peers()));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Inputs that are ready are handled as one batch, and the subscribers' writers woken
        // once for all of it (see `crate::queue`'s deferred wake-ups): one `send` per batch
        // rather than per message. Before waking them, the task yields once, so that a
        // publisher's next messages, on their way into the queue, join the batch.
        let mut handled = 0;
        while handled < hub::FrameWakes::MAX_MESSAGES * 4 {
            let Ok(next) = input.try_recv() else {
                if handled > 0 && core.writers_to_wake() > 0 {
                    tokio::task::yield_now().await;
                    if !input.is_empty() {
                        continue;
                    }
                }
                break;
            };
            core.handle(Now::clocks(), next);
            handled += 1;
        }
        core.wake_writers();
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => Input::Tick,
            changed = farm.changed() => {
                if changed.is_err() { break }
                Input::Farm(live_nodes(&farm.borrow_and_update()))
            }
            changed = peers.changed() => {
                if changed.is_err() { break }
                peers_input(&peers.borrow_and_update())
            }
            changed = link_changes.changed() => {
                if changed.is_err() { break }
                link_changes.mark_unchanged();
                Input::LinksEnded(link_ends.ended_peers())
            }
            next = input.recv() => match next {
                Some(next) => next,
                None => break,
            },
        };
        core.handle(Now::clocks(), next);
    }
    core.stop();
}

/// The relay's way into the broker: frames from peers, holes to fill.
#[derive(Clone, Debug)]
pub(crate) struct BrokerInput(mpsc::Sender<Input>);

/// The broker task's end of [`Broker::channel`].
pub(crate) struct BrokerInbox(mpsc::Receiver<Input>);

/// Delivers a message received from a replica into the hub, and asks for what is missing.
pub(crate) fn deliver_from_peer(
    hub: &Hub,
    input: &BrokerInput,
    topic: &str,
    epoch: Epoch,
    entry: Entry,
    wakes: &mut FrameWakes,
) -> Delivered {
    let delivered = hub.deliver(topic, epoch, entry, wakes);
    if let Some(after) = delivered.missing_after {
        input.fill(topic, after);
    }
    delivered
}

impl Broker {
    /// The channel into the broker task: its sending end goes to the relay before the broker
    /// starts (the broker sends through the relay, the relay delivers to the broker).
    pub(crate) fn channel() -> (BrokerInput, BrokerInbox) {
        let (input, inbox) = mpsc::channel(INPUT_QUEUE);
        (BrokerInput(input), BrokerInbox(inbox))
    }

    /// Starts the broker task of node `me` on `inbox`; it runs until `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        me: String,
        (input, inbox): (BrokerInput, BrokerInbox),
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        relay: Arc<dyn Relay>,
        farm: watch::Receiver<FarmList>,
        peers: watch::Receiver<crate::relay::Peers>,
        link_ends: Arc<crate::relay::LinkEnds>,
        limits: Limits,
        publish_timeout: Duration,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<Broker> {
        let now = Now::clocks();
        let me_span = me.clone();
        let core = Core::new(
            CoreConfig {
                me,
                run: now.unix_ms,
                seed: rand::random(),
                metrics,
                hub: hub.clone(),
                net: Box::new(RelayNetwork(relay.clone())),
                limits,
                publish_timeout,
            },
            now,
        );
        // The node's name on every line the broker logs: several nodes share a process in tests.
        let span = tracing::info_span!("broker", node = %me_span);
        tracker.spawn(tracing::Instrument::instrument(
            drive(core, inbox.0, farm, peers, link_ends, cancel),
            span,
        ));
        Arc::new(Broker {
            hub,
            relay,
            input: input.0,
            publish_timeout,
        })
    }

    /// Publishes a message farm-wide and waits until it is stored on its topic's replica and
    /// sent out: returns its position.
    /// With a `key`, a message published again under the same key (through any node, while its
    /// first copy is in the topic's history) is not published twice: it answers with the first
    /// copy's position.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        data: String,
        encoding: Encoding,
        key: Option<String>,
    ) -> Result<Position, PublishError> {
        let (done, rx) = oneshot::channel();
        self.send_input(Input::Publish {
            topic: topic.to_string(),
            data,
            encoding,
            key,
            done: Some(done),
        })
        .await?;
        match tokio::time::timeout(self.publish_timeout + TICK * 2, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Stopping),
            Err(_) => Err(PublishError::TimedOut(self.publish_timeout)),
        }
    }

    /// Publishes without waiting for the acknowledgement (a client's `pub` frame); waits only
    /// while the broker's queue is full.
    pub(crate) async fn publish_unconfirmed(&self, topic: &str, data: String, encoding: Encoding) {
        let _ = self
            .send_input(Input::Publish {
                topic: topic.to_string(),
                data,
                encoding,
                key: None,
                done: None,
            })
            .await;
    }

    async fn send_input(&self, input: Input) -> Result<(), PublishError> {
        self.input
            .send(input)
            .await
            .map_err(|_| PublishError::Stopping)
    }

    /// Subscribes connection `id` to `topics`, each live or resuming after a position: the
    /// node's peers learn its interest, missing history is fetched, and then — between two
    /// messages of each topic — the `subscribed` frame, any `gap`, the missed messages, and
    /// from then on the live ones are queued to `outlet`. Returns the subscriptions added.
    pub(crate) async fn subscribe(
        &self,
        id: ConnId,
        outlet: &Outlet,
        topics: &[(String, Resume)],
        wakes: &mut FrameWakes,
    ) -> usize {
        self.hub.reserve(id, topics.iter().map(|(t, _)| t.as_str()));
        // Peers that are linked learn the interest before anything else: what they send from
        // then on reaches this node.
        self.relay.sync_interest().await;
        let mut waits = Vec::new();
        for (topic, resume) in topics {
            if self.hub.needs_fetch(topic, *resume) {
                let (done, rx) = oneshot::channel();
                let after = match resume {
                    Resume::Live => None,
                    Resume::After(p) => Some(*p),
                };
                if self
                    .send_input(Input::Fetch {
                        topic: topic.clone(),
                        after,
                        done: Some(done),
                    })
                    .await
                    .is_ok()
                {
                    waits.push(rx);
                }
            }
        }
        for rx in waits {
            let _ = tokio::time::timeout(FETCH_WAIT + TICK * 2, rx).await;
        }
        self.hub.join(id, outlet, topics, wakes)
    }

    /// Fetches, for every topic delivered here, whatever came after its stream's position: what
    /// a node cut off from the farm missed meanwhile.
    pub(crate) async fn catch_up(&self) {
        let _ = self.send_input(Input::CatchUp).await;
    }

    /// The relay this node uses (for its gauges).
    pub(crate) fn relay(&self) -> &Arc<dyn Relay> {
        &self.relay
    }

    /// Unsubscribes connection `id` from `topics`.
    pub(crate) fn unsubscribe<'a>(&self, id: ConnId, topics: impl IntoIterator<Item = &'a str>) {
        self.hub.unsubscribe(id, topics);
    }
}

impl Network for RelayNetwork {
    fn send(&self, to: &str, frame: &PeerFrame) -> bool {
        let text = serde_json::to_string(frame).expect("frames always serialize");
        self.0.send(to, Utf8Bytes::from(text))
    }

    fn fanout(&self, topic: &str, frame: &Utf8Bytes) {
        self.0.fanout(topic, frame);
    }
}

impl BrokerInput {
    /// A frame from peer `from`. Waits while the broker is busy: the link slows down rather than
    /// anything being dropped.
    pub(crate) async fn peer(&self, from: &str, frame: PeerFrame) {
        let _ = self
            .0
            .send(Input::Peer {
                from: from.to_string(),
                frame,
            })
            .await;
    }

    /// The stream of `topic` has a hole after `after`: fetch it (once at a time per topic).
    pub(crate) fn fill(&self, topic: &str, after: Position) {
        let _ = self.0.try_send(Input::Fetch {
            topic: topic.to_string(),
            after: Some(after),
            done: None,
        });
    }

    /// Fetches, for every topic delivered here, what follows its position from every live node
    /// (see [`Core::catch_up_all`]); waits while the broker's queue is full.
    pub(crate) async fn catch_up(&self) {
        let _ = self.0.send(Input::CatchUp).await;
    }
}
