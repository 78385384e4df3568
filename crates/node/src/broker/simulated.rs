//! Farms of broker cores in one thread, on a simulated clock and network: what the core being a
//! state machine ([`Core::handle`]) makes possible. Each node is a core and its hub; frames wait
//! in one queue and are handed over in an order drawn from a seed, so a schedule replays exactly.

use std::sync::Mutex;

use rand::seq::IndexedRandom;

use super::*;

/// Milliseconds of simulated time per tick.
const TICK_MS: u64 = TICK.as_millis() as u64;

/// What travels between simulated nodes.
#[derive(Debug)]
enum Envelope {
    Frame {
        from: String,
        to: String,
        frame: PeerFrame,
    },
    /// A replica's message sent out to another node.
    Msg {
        from: String,
        to: String,
        topic: String,
        frame: Utf8Bytes,
    },
}

impl Envelope {
    /// The link it travels on: from, to.
    fn link(&self) -> (&str, &str) {
        match self {
            Envelope::Frame { from, to, .. } | Envelope::Msg { from, to, .. } => (from, to),
        }
    }
}

/// The network every simulated node shares: frames in flight, and who is reachable.
#[derive(Default)]
struct Wires {
    in_flight: Vec<Envelope>,
    nodes: Vec<String>,
    down: HashSet<String>,
}

/// One node's end of [`Wires`].
struct SimNetwork {
    me: String,
    wires: Arc<Mutex<Wires>>,
}

impl Network for SimNetwork {
    fn send(&self, to: &str, frame: &PeerFrame) -> bool {
        let mut wires = self.wires.lock().unwrap();
        if wires.down.contains(to) || wires.down.contains(&self.me) {
            return false;
        }
        wires.in_flight.push(Envelope::Frame {
            from: self.me.clone(),
            to: to.to_string(),
            frame: frame.clone(),
        });
        true
    }

    fn fanout(&self, topic: &str, frame: &Utf8Bytes) {
        let mut wires = self.wires.lock().unwrap();
        if wires.down.contains(&self.me) {
            return;
        }
        let others: Vec<String> = wires
            .nodes
            .iter()
            .filter(|n| **n != self.me && !wires.down.contains(*n))
            .cloned()
            .collect();
        for to in others {
            wires.in_flight.push(Envelope::Msg {
                from: self.me.clone(),
                to,
                topic: topic.to_string(),
                frame: frame.clone(),
            });
        }
    }
}

struct SimNode {
    name: String,
    core: Core,
    hub: Arc<Hub>,
}

/// A farm of cores on one simulated clock.
struct SimFarm {
    nodes: Vec<SimNode>,
    wires: Arc<Mutex<Wires>>,
    rng: StdRng,
    start: Instant,
    ms: u64,
}

impl SimFarm {
    /// `size` nodes, every one interested in `topics`, each told the others are live.
    fn new(size: usize, seed: u64, topics: &[&str]) -> SimFarm {
        let names: Vec<String> = (1..=size).map(|i| format!("n{i}")).collect();
        let wires = Arc::new(Mutex::new(Wires {
            nodes: names.clone(),
            ..Wires::default()
        }));
        let start = Instant::now();
        let mut farm = SimFarm {
            nodes: Vec::new(),
            wires: wires.clone(),
            rng: StdRng::seed_from_u64(seed),
            start,
            ms: 0,
        };
        for (i, name) in names.iter().enumerate() {
            let limits = Limits {
                bytes: 1 << 20,
                age: Duration::from_secs(3600),
            };
            let hub = Arc::new(Hub::new(Arc::default(), limits));
            // A reservation for a connection that is not open: the topic's stream exists, so the
            // node delivers it, and its history is what this node's subscribers would be sent.
            hub.reserve(0, topics.iter().copied());
            let core = Core::new(
                CoreConfig {
                    me: name.clone(),
                    run: 1,
                    seed: seed ^ (i as u64 + 1),
                    metrics: Arc::default(),
                    hub: hub.clone(),
                    net: Box::new(SimNetwork {
                        me: name.clone(),
                        wires: wires.clone(),
                    }),
                    limits,
                    publish_timeout: Duration::from_secs(10),
                },
                farm.now(),
            );
            farm.nodes.push(SimNode {
                name: name.clone(),
                core,
                hub,
            });
        }
        for i in 0..size {
            let now = farm.now();
            let known = names.iter().filter(|n| **n != names[i]).cloned().collect();
            let core = &mut farm.nodes[i].core;
            core.handle(
                now,
                Input::Peers {
                    settled: true,
                    known,
                },
            );
            core.handle(now, Input::Farm(names.clone()));
        }
        farm
    }

    fn now(&self) -> Now {
        Now {
            at: self.start + Duration::from_millis(self.ms),
            unix_ms: 1_700_000_000_000 + self.ms,
        }
    }

    fn node(&mut self, name: &str) -> &mut SimNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    fn is_down(&self, name: &str) -> bool {
        self.wires.lock().unwrap().down.contains(name)
    }

    /// Hands over one frame in flight: the oldest on a link drawn at random (a relay link, like
    /// the socket under it, keeps its frames in order); false when none is in flight.
    fn step(&mut self) -> bool {
        let envelope = {
            let mut wires = self.wires.lock().unwrap();
            if wires.in_flight.is_empty() {
                return false;
            }
            let drawn = self.rng.random_range(0..wires.in_flight.len());
            let link = wires.in_flight[drawn].link();
            let oldest = wires
                .in_flight
                .iter()
                .position(|e| e.link() == link)
                .unwrap_or(drawn);
            wires.in_flight.remove(oldest)
        };
        let now = self.now();
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("{} {envelope:?}", self.ms);
        }
        match envelope {
            Envelope::Frame { from, to, frame } => {
                if self.is_down(&to) {
                    return true;
                }
                self.node(&to).core.handle(now, Input::Peer { from, frame });
            }
            Envelope::Msg {
                to, topic, frame, ..
            } => {
                if self.is_down(&to) {
                    return true;
                }
                let node = self.node(&to);
                let position = ServerFrame::from_json(&frame)
                    .ok()
                    .and_then(|f| f.position())
                    .unwrap_or_else(|| panic!("a replica sent out no message: {frame}"));
                let entry = Entry {
                    offset: position.offset,
                    id: PublishId::default(),
                    frame,
                    stored: now.at,
                };
                let mut wakes = FrameWakes::default();
                let delivered = node.hub.deliver(&topic, position.epoch, entry, &mut wakes);
                if let Some(after) = delivered.missing_after {
                    node.core.handle(
                        now,
                        Input::Fetch {
                            topic,
                            after: Some(after),
                            done: None,
                        },
                    );
                }
            }
        }
        true
    }

    /// Hands over every frame, then lets `ms` of simulated time pass, a tick at a time.
    fn run_for(&mut self, ms: u64) {
        let end = self.ms + ms;
        loop {
            while self.step() {}
            if self.ms >= end {
                return;
            }
            self.ms += TICK_MS;
            let now = self.now();
            for i in 0..self.nodes.len() {
                if !self.is_down(&self.nodes[i].name) {
                    self.nodes[i].core.handle(now, Input::Tick);
                }
            }
        }
    }

    /// Publishes on node `on`; the receiver gets the position once acknowledged.
    fn publish(
        &mut self,
        on: &str,
        topic: &str,
        data: &str,
    ) -> oneshot::Receiver<Result<Position, PublishError>> {
        let (done, rx) = oneshot::channel();
        let now = self.now();
        self.node(on).core.handle(
            now,
            Input::Publish {
                topic: topic.to_string(),
                data: data.to_string(),
                encoding: Encoding::Utf8,
                key: None,
                done: Some(done),
            },
        );
        rx
    }

    /// Node `name` stops: nothing reaches it or leaves it, and the others list it `DOWN`.
    fn kill(&mut self, name: &str) {
        self.wires.lock().unwrap().down.insert(name.to_string());
        let live: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| !self.is_down(n))
            .collect();
        let now = self.now();
        for node in self.nodes.iter_mut().filter(|n| live.contains(&n.name)) {
            node.core.handle(now, Input::Farm(live.clone()));
        }
    }

    /// The messages node `name` delivered of `topic`: (position, data), in delivery order.
    fn delivered(&self, name: &str, topic: &str) -> Vec<(Position, String)> {
        let node = self.nodes.iter().find(|n| n.name == name).unwrap();
        let Some(state) = node.hub.state(topic, None) else {
            return Vec::new();
        };
        state
            .entries
            .iter()
            .map(|e| (Position::new(state.epoch, e.offset), e.data.clone()))
            .collect()
    }
}

/// Every acknowledged publish is in `delivered` exactly once, at its acknowledged position, and
/// `delivered` runs in offset order without holes.
fn assert_delivered_once_in_order(
    node: &str,
    delivered: &[(Position, String)],
    acked: &[(Position, String)],
) {
    for pair in delivered.windows(2) {
        assert_eq!(
            pair[1].0.offset,
            pair[0].0.offset + 1,
            "{node}: delivered out of order or with a hole: {delivered:?}"
        );
    }
    for (position, data) in acked {
        let copies = delivered
            .iter()
            .filter(|(p, d)| p == position && d == data)
            .count();
        assert_eq!(
            copies, 1,
            "{node}: acknowledged {data:?} at {position} delivered {copies} times"
        );
    }
}

fn acked(
    receivers: Vec<(String, oneshot::Receiver<Result<Position, PublishError>>)>,
) -> Vec<(Position, String)> {
    receivers
        .into_iter()
        .map(|(data, mut rx)| {
            let position = rx
                .try_recv()
                .unwrap_or_else(|_| panic!("{data:?} got no answer"))
                .unwrap_or_else(|err| panic!("{data:?} not acknowledged: {err}"));
            (position, data)
        })
        .collect()
}

#[test]
fn every_node_delivers_each_acknowledged_publish_once_in_order() {
    for seed in 0..20 {
        let mut farm = SimFarm::new(3, seed, &["t"]);
        let mut sent = Vec::new();
        for i in 0..30 {
            let on = ["n1", "n2", "n3"][i % 3];
            let data = format!("m{i}");
            sent.push((data.clone(), farm.publish(on, "t", &data)));
            farm.run_for(0);
        }
        farm.run_for(1_000);
        let acked = acked(sent);
        for node in ["n1", "n2", "n3"] {
            let delivered = farm.delivered(node, "t");
            assert_eq!(delivered.len(), 30, "seed {seed}, {node}: {delivered:?}");
            assert_delivered_once_in_order(node, &delivered, &acked);
        }
    }
}

#[test]
fn the_sequencer_killed_its_replica_goes_on_in_the_same_epoch_and_loses_nothing() {
    for seed in 0..20 {
        let names = ["n1", "n2", "n3"];
        let mut farm = SimFarm::new(3, seed, &["t"]);
        let sequencer = farm.nodes[0].core.placement("t").sequencer;
        let publishers: Vec<&str> = names.into_iter().filter(|n| *n != sequencer).collect();
        let mut sent = Vec::new();
        for i in 0..20 {
            let data = format!("before{i}");
            sent.push((data.clone(), farm.publish(publishers[i % 2], "t", &data)));
        }
        farm.run_for(500);
        let before = acked(std::mem::take(&mut sent));
        let epoch = before[0].0.epoch;
        farm.kill(&sequencer);
        for i in 0..20 {
            let data = format!("after{i}");
            sent.push((data.clone(), farm.publish(publishers[i % 2], "t", &data)));
            let pause = *[0, TICK_MS].choose(&mut farm.rng).unwrap();
            farm.run_for(pause);
        }
        farm.run_for(3_000);
        let after = acked(sent);
        assert!(
            after.iter().all(|(p, _)| p.epoch == epoch),
            "seed {seed}: a new epoch although the replica held the topic: {after:?}"
        );
        let all: Vec<(Position, String)> = before.into_iter().chain(after).collect();
        for node in publishers {
            let delivered = farm.delivered(node, "t");
            assert_eq!(delivered.len(), 40, "seed {seed}, {node}: {delivered:?}");
            assert_delivered_once_in_order(node, &delivered, &all);
        }
    }
}
