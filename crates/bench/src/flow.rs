//! Messages flowing through a failure: a publisher at a steady rate whose payloads carry sequence
//! numbers, and, per client, what arrived counted against what the publisher had accepted.
//!
//! Counting is from the payloads alone (the `seq` of [`crate::wire::payload`]), never from a
//! server-side position, so it holds the same for streamfarm and nats-server and stays true when
//! the node gains positions. Per client, over the window `[from_seq, end)`:
//! - **lost**: accepted sequence numbers the client never received;
//! - **duplicated**: copies received beyond the first;
//! - **out of order**: messages whose sequence is below one already received;
//! - **declared**: what the client library said it could not deliver ([`declared_gaps`]).
//!
//! A publish is *accepted* when the server acknowledged it: `2xx` to `POST /publish/{topic}`, or a
//! `PONG` after the NATS `PUB`. One not acknowledged (the publisher's node just died) is counted
//! apart and never as lost: nobody promised to deliver it. The publisher sends one message at a
//! time (so the order it publishes in is the order a subscriber must see), on a keep-alive
//! connection, paced by a Tokio interval that catches up after a slow answer; when its server
//! fails it publishes the same message on the next server of its list, and stays there.
//!
//! *Caught up* ([`Tally::caught_up_ms`]): a client that moved is caught up once it holds every
//! accepted message published up to its resubscription. Until messages lost in a failover can be
//! recovered, a client that lost any never is.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use streamfarm_client::Event;
use tokio::sync::{oneshot, watch};

use crate::wire::{HttpConn, Nats, now_ns, payload};

/// How many messages, by the client library's own word, were lost for good in `event`; `None`
/// for an event that declares nothing.
///
/// [`Event::Gap`] names an exact range, `from..=to` (inclusive); a gap without `to` (the rest of
/// a lost epoch) names no count and counts 1. [`Event::Recovered`] declares nothing lost.
pub(crate) fn declared_gaps(event: &Event) -> Option<u64> {
    match event {
        Event::Gap { from, to, .. } => Some(to.map_or(1, |to| to.saturating_sub(*from) + 1)),
        _ => None,
    }
}

/// Milliseconds on the bench clock ([`now_ns`]): publish and receipt times share it.
pub(crate) fn now_ms() -> u32 {
    (now_ns() / 1_000_000) as u32
}

/// Microseconds on the bench clock ([`now_ns`]).
pub(crate) fn now_us() -> u64 {
    now_ns() / 1000
}

/// Bytes of each payload: the smallest [`payload`] (sequence and send time).
const PAYLOAD_BYTES: usize = 32;
/// How long one publish attempt on one server may take (connect included).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// Sequence numbers above this are not ours (a payload that is not the publisher's).
const MAX_SEQ: u64 = 1 << 26;
/// `127.0.0.last`.
pub(crate) fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
}

/// The source address of the `i`-th library client: 127.0.0.20–27 in turn, so that the clients'
/// connections spread over eight addresses' ports and never share a node's address.
pub(crate) fn client_source(i: usize) -> IpAddr {
    loopback(20 + (i % 8) as u8)
}

/// The publisher's source address: neither a node's (127.0.0.1–3) nor a client's (127.0.0.20–27),
/// so a partition's rules never touch it.
pub(crate) const PUBLISHER_SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 30));
/// In a receipt: no copy arrived.
const NONE: u32 = u32::MAX;

/// Where the publisher publishes.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// Streamfarm nodes, by HTTP (`POST /publish/{topic}`), in order of preference.
    Streamfarm {
        /// Nodes' HTTP addresses.
        nodes: Vec<SocketAddr>,
        /// The topic.
        topic: String,
    },
    /// nats-servers, by the NATS protocol, in order of preference.
    Nats {
        /// Client addresses.
        servers: Vec<SocketAddr>,
        /// The subject.
        subject: String,
    },
}

/// What the publisher did, per sequence number.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ledger {
    /// When each message was sent, µs on the bench clock ([`now_us`]).
    sent_us: Vec<u64>,
    /// Whether each message was acknowledged.
    accepted: Vec<bool>,
    /// Messages published on another server than the one tried first (its server had failed).
    pub(crate) moved: u64,
}

impl Ledger {
    fn record(&mut self, sent_us: u64, accepted: bool) {
        self.sent_us.push(sent_us);
        self.accepted.push(accepted);
    }

    /// Messages sent.
    pub(crate) fn len(&self) -> u64 {
        self.sent_us.len() as u64
    }

    /// Accepted messages from `from_seq` on.
    pub(crate) fn accepted_since(&self, from_seq: u64) -> u64 {
        let from = (from_seq as usize).min(self.accepted.len());
        self.accepted[from..].iter().filter(|a| **a).count() as u64
    }

    /// Messages from `from_seq` on that no server acknowledged.
    pub(crate) fn not_accepted_since(&self, from_seq: u64) -> u64 {
        self.len().saturating_sub(from_seq) - self.accepted_since(from_seq)
    }

    /// Sent per second from `from_seq` to the end.
    pub(crate) fn rate_since(&self, from_seq: u64) -> f64 {
        let from = from_seq as usize;
        match (self.sent_us.get(from), self.sent_us.last()) {
            (Some(first), Some(last)) if last > first => {
                (self.sent_us.len() - from) as f64 * 1e6 / (last - first) as f64
            }
            _ => f64::NAN,
        }
    }

    /// From `at_us` to the first accepted message sent after it, ms.
    pub(crate) fn first_accepted_after(&self, at_us: u64) -> Option<f64> {
        let start = self.sent_us.partition_point(|t| *t < at_us);
        (start..self.sent_us.len())
            .find(|i| self.accepted[*i])
            .map(|i| (self.sent_us[i] - at_us) as f64 / 1000.0)
    }
}

/// A publisher running at a steady rate until stopped (or dropped).
///
/// It runs on its own OS thread with its own single-threaded runtime, not on the runtime the
/// thousands of clients share: there a publish waited behind their tasks, and the publisher fell
/// to 470–650 messages/s of the 1000 asked for (2 cores, C = 500).
#[derive(Debug)]
pub(crate) struct Publisher {
    stop: watch::Sender<bool>,
    next_seq: Arc<AtomicU64>,
    ledger: Option<oneshot::Receiver<Ledger>>,
}

impl Publisher {
    /// Starts publishing `rate` messages per second on `target`.
    pub(crate) fn start(target: Target, rate: f64) -> anyhow::Result<Publisher> {
        let (stop, stopped) = watch::channel(false);
        let (ledger_tx, ledger) = oneshot::channel();
        let next_seq = Arc::new(AtomicU64::new(0));
        let sink = Sink {
            target,
            current: 0,
            conn: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("publisher runtime")?;
        let next = next_seq.clone();
        std::thread::Builder::new()
            .name("publisher".to_string())
            .spawn(move || {
                let ledger = runtime.block_on(publish(sink, rate, stopped, next));
                let _ = ledger_tx.send(ledger);
            })
            .context("cannot start the publisher's thread")?;
        Ok(Publisher {
            stop,
            next_seq,
            ledger: Some(ledger),
        })
    }

    /// The sequence number of the next message.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Stops after the message in flight and returns what was published.
    pub(crate) async fn stop(mut self) -> anyhow::Result<Ledger> {
        let _ = self.stop.send(true);
        let ledger = self.ledger.take().context("publisher already stopped")?;
        tokio::time::timeout(PUBLISH_TIMEOUT * 4, ledger)
            .await
            .context("the publisher did not stop")?
            .context("the publisher's thread ended without its ledger")
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // Ends the thread after the message in flight (at most [`PUBLISH_TIMEOUT`] per server).
        let _ = self.stop.send(true);
    }
}

async fn publish(
    mut sink: Sink,
    rate: f64,
    mut stopped: watch::Receiver<bool>,
    next_seq: Arc<AtomicU64>,
) -> Ledger {
    let mut ledger = Ledger::default();
    // The default `Burst` behaviour: after a slow answer the missed ticks fire at once, so the
    // rate holds on average.
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    loop {
        tokio::select! {
            biased;
            _ = stopped.changed() => break,
            _ = tick.tick() => {}
        }
        let seq = ledger.len();
        let data = payload(seq, PAYLOAD_BYTES);
        let sent = now_us();
        let (accepted, moved) = sink.publish(&data).await;
        ledger.record(sent, accepted);
        ledger.moved += u64::from(moved);
        next_seq.store(seq + 1, Ordering::Relaxed);
    }
    ledger
}

/// The publisher's connection and the server it publishes on.
struct Sink {
    target: Target,
    current: usize,
    conn: Option<Conn>,
}

enum Conn {
    Http(HttpConn),
    Nats(Box<Nats>),
}

impl Sink {
    fn servers(&self) -> &[SocketAddr] {
        match &self.target {
            Target::Streamfarm { nodes, .. } => nodes,
            Target::Nats { servers, .. } => servers,
        }
    }

    /// Publishes `data` on the current server, or on the next ones when it fails: (accepted,
    /// moved to another server).
    async fn publish(&mut self, data: &str) -> (bool, bool) {
        let servers = self.servers().len();
        for attempt in 0..servers {
            let once = tokio::time::timeout(PUBLISH_TIMEOUT, self.publish_once(data));
            if let Ok(Ok(true)) = once.await {
                return (true, attempt > 0);
            }
            self.conn = None;
            self.current = (self.current + 1) % servers;
        }
        (false, false)
    }

    async fn publish_once(&mut self, data: &str) -> anyhow::Result<bool> {
        let server = self.servers()[self.current];
        match &self.target {
            Target::Streamfarm { topic, .. } => {
                let path = format!("/publish/{topic}");
                if !matches!(self.conn, Some(Conn::Http(_))) {
                    let conn = HttpConn::connect(server, Some(PUBLISHER_SOURCE), PUBLISH_TIMEOUT);
                    self.conn = Some(Conn::Http(conn.await?));
                }
                let Some(Conn::Http(conn)) = &mut self.conn else {
                    unreachable!("connected above");
                };
                // The payload (its sequence number and send time) names the message: sent again
                // through the next node after a failure, it is not published twice.
                let status = conn.post(&path, data, Some(data)).await?;
                if !conn.reusable() {
                    self.conn = None;
                }
                Ok((200..300).contains(&status))
            }
            Target::Nats { subject, .. } => {
                let subject = subject.clone();
                if !matches!(self.conn, Some(Conn::Nats(_))) {
                    let nats = Nats::connect(server, Some(PUBLISHER_SOURCE)).await?;
                    self.conn = Some(Conn::Nats(Box::new(nats)));
                }
                let Some(Conn::Nats(nats)) = &mut self.conn else {
                    unreachable!("connected above");
                };
                nats.publish_confirmed(&subject, data).await?;
                Ok(true)
            }
        }
    }
}

/// What one client received, by sequence number.
#[derive(Debug, Default, Clone)]
pub(crate) struct Receipts {
    /// When the first copy of each message arrived, ms ([`NONE`]: not yet).
    first_ms: Vec<u32>,
    /// Copies of each message received (saturating).
    copies: Vec<u8>,
    /// The highest sequence received so far.
    highest: Option<u64>,
    /// Messages whose sequence was below one already received.
    out_of_order: u64,
    /// What the client library declared lost ([`declared_gaps`]).
    declared: u64,
    /// The longest a message took from its publish to this client, µs.
    delay_max_us: u64,
    /// The same, over the messages that arrived before the failure: with a steady rate and no
    /// failure yet, more than a few ms says the load generator (or the machine) cannot keep up.
    steady_delay_max_us: u64,
}

impl Receipts {
    /// Notes a message that arrived at `at_ms` (`steady`: before the failure), from its payload;
    /// false if the payload is not the publisher's.
    pub(crate) fn record(&mut self, payload: &[u8], at_ms: u32, steady: bool) -> bool {
        let Some((seq, sent_ns)) = crate::wire::parse_payload(payload) else {
            return false;
        };
        if seq >= MAX_SEQ {
            return false;
        }
        let i = seq as usize;
        if self.first_ms.len() <= i {
            self.first_ms.resize(i + 1, NONE);
            self.copies.resize(i + 1, 0);
        }
        if self.first_ms[i] == NONE {
            self.first_ms[i] = at_ms;
        }
        self.copies[i] = self.copies[i].saturating_add(1);
        let delay = now_ns().saturating_sub(sent_ns) / 1000;
        self.delay_max_us = self.delay_max_us.max(delay);
        if steady {
            self.steady_delay_max_us = self.steady_delay_max_us.max(delay);
        }
        match self.highest {
            Some(h) if seq < h => self.out_of_order += 1,
            _ => self.highest = Some(seq),
        }
        true
    }

    /// Notes an event of the client library (see [`declared_gaps`]).
    pub(crate) fn event(&mut self, event: &Event) {
        self.declared += declared_gaps(event).unwrap_or(0);
    }

    /// Whether any message has arrived.
    pub(crate) fn any(&self) -> bool {
        self.highest.is_some()
    }

    fn first(&self, seq: usize) -> u32 {
        self.first_ms.get(seq).copied().unwrap_or(NONE)
    }

    fn copies(&self, seq: usize) -> u8 {
        self.copies.get(seq).copied().unwrap_or(0)
    }
}

/// One client's count over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Tally {
    /// Accepted messages in the window.
    pub(crate) expected: u64,
    /// Accepted messages in the window never received.
    pub(crate) lost: u64,
    /// Copies beyond the first, of messages in the window.
    pub(crate) duplicated: u64,
    /// Messages received below the highest already received.
    pub(crate) out_of_order: u64,
    /// Declared lost by the client library.
    pub(crate) declared: u64,
    /// The longest a message took from its publish to the client, µs: a stall that ended
    /// without loss (a hang, a partition healed by TCP's retransmissions) shows here.
    pub(crate) delay_max_us: u64,
    /// The longest a message took before the failure, µs (see [`Receipts`]).
    pub(crate) steady_delay_max_us: u64,
    /// From the loss (`loss_ms`) until the client held every accepted message published up to
    /// its resubscription (`back_ms`); `None` when it never did, or did not move.
    pub(crate) caught_up_ms: Option<f64>,
}

/// Counts `receipts` against `ledger` from `from_seq` to the ledger's end. `moved` is (loss,
/// resubscribed) in ms for a client that moved to another server.
pub(crate) fn tally(
    receipts: &Receipts,
    ledger: &Ledger,
    from_seq: u64,
    moved: Option<(u32, u32)>,
) -> Tally {
    let window = (from_seq as usize).min(ledger.sent_us.len())..ledger.sent_us.len();
    let mut tally = Tally {
        expected: 0,
        lost: 0,
        duplicated: 0,
        out_of_order: receipts.out_of_order,
        declared: receipts.declared,
        delay_max_us: receipts.delay_max_us,
        steady_delay_max_us: receipts.steady_delay_max_us,
        caught_up_ms: None,
    };
    for seq in window.clone() {
        let copies = receipts.copies(seq);
        tally.duplicated += u64::from(copies.saturating_sub(1));
        if ledger.accepted[seq] {
            tally.expected += 1;
            tally.lost += u64::from(copies == 0);
        }
    }
    if let Some((loss_ms, back_ms)) = moved {
        let back_us = u64::from(back_ms) * 1000;
        let upto = window.start + ledger.sent_us[window.clone()].partition_point(|t| *t <= back_us);
        let mut last = back_ms;
        let mut complete = true;
        for seq in window.start..upto {
            if !ledger.accepted[seq] {
                continue;
            }
            match receipts.first(seq) {
                NONE => {
                    complete = false;
                    break;
                }
                at => last = last.max(at),
            }
        }
        if complete {
            tally.caught_up_ms = Some(f64::from(last.saturating_sub(loss_ms)));
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(accepted: &[bool]) -> Ledger {
        let mut ledger = Ledger::default();
        for (i, a) in accepted.iter().enumerate() {
            ledger.record((100 + 10 * i as u64) * 1000, *a);
        }
        ledger
    }

    fn receive(receipts: &mut Receipts, seqs: &[u64], at_ms: u32) {
        for seq in seqs {
            assert!(receipts.record(payload(*seq, PAYLOAD_BYTES).as_bytes(), at_ms, true));
        }
    }

    #[test]
    fn a_clean_run_counts_nothing() {
        let ledger = ledger(&[true; 6]);
        let mut r = Receipts::default();
        receive(&mut r, &[0, 1, 2, 3, 4, 5], 200);
        let t = tally(&r, &ledger, 0, None);
        assert_eq!(
            (t.expected, t.lost, t.duplicated, t.out_of_order),
            (6, 0, 0, 0)
        );
    }

    #[test]
    fn lost_duplicated_and_out_of_order_are_counted_apart() {
        // 2 never arrives, 3 twice, 1 after 4; 5 was not accepted and is not lost.
        let ledger = ledger(&[true, true, true, true, true, false, true]);
        let mut r = Receipts::default();
        receive(&mut r, &[0, 3, 3, 4, 1, 6], 200);
        let t = tally(&r, &ledger, 0, None);
        assert_eq!(t.expected, 6);
        assert_eq!(t.lost, 1, "only 2: 5 was not accepted");
        assert_eq!(t.duplicated, 1);
        assert_eq!(
            t.out_of_order, 1,
            "1 after 4 is; the second 3 is a duplicate, not below 3"
        );
    }

    #[test]
    fn the_window_starts_at_from_seq() {
        let ledger = ledger(&[true; 5]);
        let mut r = Receipts::default();
        receive(&mut r, &[3, 4], 200);
        let t = tally(&r, &ledger, 3, None);
        assert_eq!((t.expected, t.lost), (2, 0));
    }

    #[test]
    fn caught_up_needs_every_message_up_to_the_resubscription() {
        // Sent at 100, 110, …, 150. Loss at 115, back at 135: messages 0..=3 must be held.
        let ledger = ledger(&[true; 6]);
        let mut full = Receipts::default();
        receive(&mut full, &[0, 1], 112);
        receive(&mut full, &[2, 3], 160);
        receive(&mut full, &[4, 5], 170);
        let t = tally(&full, &ledger, 0, Some((115, 135)));
        assert_eq!(t.caught_up_ms, Some(45.0));
        let mut gap = Receipts::default();
        receive(&mut gap, &[0, 1, 3, 4, 5], 150);
        assert_eq!(tally(&gap, &ledger, 0, Some((115, 135))).caught_up_ms, None);
        assert_eq!(tally(&gap, &ledger, 0, Some((115, 135))).lost, 1);
    }

    #[test]
    fn foreign_payloads_are_ignored() {
        let mut r = Receipts::default();
        assert!(!r.record(b"hello", 1, true));
        assert!(!r.any());
    }

    #[test]
    fn ledger_rates_and_first_accepted() {
        let ledger = ledger(&[true, false, false, true]);
        assert_eq!(ledger.accepted_since(0), 2);
        assert_eq!(ledger.not_accepted_since(1), 2);
        assert_eq!(ledger.first_accepted_after(105_000), Some(25.0));
        assert!((ledger.rate_since(0) - 4.0 * 1000.0 / 30.0).abs() < 1e-9);
    }

    #[test]
    fn a_gap_declares_its_range_and_a_recovery_nothing() {
        let gap = |to| Event::Gap {
            topic: "t".into(),
            epoch: streamfarm_client::Epoch(1),
            from: 4,
            to,
            reason: "history_exceeded".into(),
        };
        assert_eq!(declared_gaps(&gap(Some(9))), Some(6));
        assert_eq!(declared_gaps(&gap(None)), Some(1));
        let recovered = Event::Recovered {
            topic: "t".into(),
            count: 12,
        };
        assert_eq!(declared_gaps(&recovered), None);
        let message = Event::Message {
            topic: "t".into(),
            payload: vec![],
            position: None,
        };
        assert_eq!(declared_gaps(&message), None);
    }
}
