//! Counters, gauges and histograms of one node, rendered as Prometheus text on `GET /metrics`.
//!
//! Plain atomics rather than a metrics framework: the hot paths (fan-out, accept) only add to a
//! relaxed counter, and the exposition format is a few lines of text.
//!
//! Histograms have fixed buckets, the same on every node, rather than an `hdrhistogram` per node:
//! Prometheus stores buckets anyway (an HDR histogram would have to be folded into fixed `le`
//! buckets at every scrape), fixed buckets of many nodes add up (`histogram_quantile(0.99,
//! sum by (le) (rate(..._bucket[5m])))` is the farm's p99), and recording stays one relaxed
//! atomic add per bucket, sum and nothing else, with no lock on the paths that observe. The cost
//! is resolution: a quantile is known to within its bucket, and the bounds below are chosen around
//! the figures BENCHMARKS.md quotes (milliseconds for subscribes and publishes, seconds for
//! migrations).
//!
//! Publish-to-delivery ([`Metrics::delivery_seconds`]) is observed once per message and node, when
//! the message's frame has been queued to every local subscriber, not once per subscriber: the
//! subscribers of one message on one node are served by the same fan-out loop within
//! microseconds of each other, so per-subscriber observations would repeat the same figure, and at
//! a fan-out of thousands they would add thousands of atomic adds on the same few cache lines to
//! every message (the fan-out itself costs a few hundred nanoseconds per subscriber). What it
//! measures is a difference of two machines' wall clocks: the sequencer's when it gave the message
//! its position (the `msg` frame's `ts`, in whole milliseconds) and this node's; clocks that
//! disagree shift it by their skew, and a negative result (this node's clock behind) counts as 0.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use streamfarm_core::{FarmList, Status};

/// Every number the node exports. All counters are monotonic; gauges say so.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Gauge: open streaming connections (the node's users).
    pub connections: AtomicU64,
    /// Streaming connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Gauge: open streaming connections that are server-sent event streams (in `connections`
    /// too).
    pub sse_connections: AtomicU64,
    /// Streaming connections refused (full, draining, down).
    pub connections_refused: AtomicU64,
    /// Gauge: (connection, topic) subscriptions held.
    pub subscriptions: AtomicU64,
    /// Messages published on this node (HTTP or WebSocket).
    pub messages_published: AtomicU64,
    /// Messages received from peer nodes over the relay.
    pub relay_messages_in: AtomicU64,
    /// Messages sent to peer nodes over the relay.
    pub relay_messages_out: AtomicU64,
    /// Relay links reset because a peer could not keep up.
    pub relay_drops: AtomicU64,
    /// Message frames queued to local clients.
    pub messages_delivered: AtomicU64,
    /// Messages sent to resuming clients from history (missed while they were away).
    pub messages_recovered: AtomicU64,
    /// Publishes given up: not acknowledged in time, or refused while too many were waiting.
    pub publish_failures: AtomicU64,
    /// Gauge: bytes of topic history this node holds for delivery and recovery.
    pub history_bytes: AtomicU64,
    /// Clients closed because their send queue was full.
    pub slow_consumers: AtomicU64,
    /// Client frames that could not be parsed or served.
    pub bad_frames: AtomicU64,
    /// Client frames over the size limit.
    pub oversized_frames: AtomicU64,
    /// Connections closed for heartbeat timeout.
    pub heartbeat_timeouts: AtomicU64,
    /// Clients told to move to another server (`migrate`), by rebalancing, drain or shutdown.
    pub migrations_started: AtomicU64,
    /// Clients told to move that left by themselves (they moved).
    pub migrations_completed: AtomicU64,
    /// Clients told to move that were still here at the deadline, closed with `4000`.
    pub migrations_timed_out: AtomicU64,
    /// Clients without the `migrate` feature closed with `4000` to move them.
    pub migrations_closed: AtomicU64,
    /// Moved clients that arrived here (their `hello` said `migrating`).
    pub migrations_received: AtomicU64,
    /// Gauge: this node's fair share of the farm's users (see `streamfarm_core::balance`).
    pub rebalance_target: AtomicU64,
    /// Credentials refused: connections closed for a missing, invalid or expired token, and
    /// `401` answers of the publish and admin APIs.
    pub auth_failures: AtomicU64,
    /// Valid credentials that did not allow what was asked: subscriptions and publishes refused
    /// as `forbidden`, connections closed `4013`, `403` answers of the publish API.
    pub auth_forbidden: AtomicU64,
    /// Gauge: 1 while the gossip task runs, 0 while it is down (the farm does not hear from this
    /// node; `/healthz` answers 503).
    pub gossip_up: AtomicU64,
    /// Times the gossip task stopped on its own (a fatal socket error, a panic) and was restarted.
    pub gossip_failures: AtomicU64,
    /// Gossip datagrams dropped before decoding: failed authentication with the farm secret, or
    /// not a gossip message at all (shared with the gossip transport).
    pub gossip_rejected: std::sync::Arc<AtomicU64>,
    /// Relay links refused: the handshake failed (no farm secret, a wrong one, a bad frame, or
    /// too slow), or the peer declared more interest than allowed.
    pub relay_auth_failures: AtomicU64,
    /// Times the NATS relay lost its connection to NATS (0 with the embedded relay).
    pub relay_disconnects: AtomicU64,
    /// `POST /publish` from the request's arrival to the farm's acknowledgement: the message
    /// stored on its topic's sequencer and replica, and sent out to the nodes delivering it.
    pub publish_seconds: Histogram<Seconds>,
    /// A `sub` frame from its arrival to its `subscribed` answer with the missed messages queued
    /// (peers told of the interest, history fetched where this node had none).
    pub subscribe_seconds: Histogram<Seconds>,
    /// Clients told to move (`migrate`) that left by themselves: from the `migrate` frame to the
    /// old connection's close, which the client sends once it has resumed on its new server.
    pub migration_seconds: Histogram<Seconds>,
    /// Messages delivered to local subscribers (WebSocket and server-sent events), once per message
    /// on this node: from the farm accepting it (its sequencer's wall clock when it gave the
    /// position, the frame's `ts`) to its frame queued to every local subscriber, relayed from
    /// other nodes or not. Negative (clock skew) counts as 0; see the module doc.
    pub delivery_seconds: Histogram<Seconds>,
    /// Resuming subscriptions (a `sub` with positions, after a failover or a move), per topic: the
    /// messages this node sent from history to catch the client up.
    pub recovery_messages: Histogram<Messages>,
    /// `sub` frames with positions: clients resuming after a failover or a move (its rate is the
    /// resubscriptions per second).
    pub resubscriptions: AtomicU64,
}

/// The bucket bounds of one kind of histogram, in the unit it records in.
pub trait Buckets {
    /// Upper bounds, ascending, in recorded units; `+Inf` is implied.
    const BOUNDS: &'static [u64];
    /// Recorded units per exported unit (microseconds per second: 1e6).
    const PER_UNIT: f64;
}

/// Durations: recorded in microseconds, exported in seconds, from 1 ms to 30 s.
#[derive(Debug, Default)]
pub struct Seconds;

impl Buckets for Seconds {
    const BOUNDS: &'static [u64] = &[
        1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
        2_500_000, 5_000_000, 10_000_000, 30_000_000,
    ];
    const PER_UNIT: f64 = 1e6;
}

/// Counts of messages, from 0 (a client that missed nothing) to 10 000.
#[derive(Debug, Default)]
pub struct Messages;

impl Buckets for Messages {
    const BOUNDS: &'static [u64] = &[0, 1, 10, 100, 1_000, 10_000];
    const PER_UNIT: f64 = 1.0;
}

/// Most buckets a histogram has, `+Inf` included.
const MAX_BUCKETS: usize = 16;

/// A Prometheus histogram with the fixed buckets of `B` (see the module doc for why fixed).
#[derive(Debug, Default)]
pub struct Histogram<B> {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [AtomicU64; MAX_BUCKETS],
    /// Sum of the observations, in recorded units.
    sum: AtomicU64,
    buckets: std::marker::PhantomData<B>,
}

impl<B: Buckets> Histogram<B> {
    /// Records one observation, in `B`'s recorded unit.
    pub fn observe(&self, value: u64) {
        const { assert!(B::BOUNDS.len() < MAX_BUCKETS) };
        let bucket = B::BOUNDS.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts[..=B::BOUNDS.len()]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of the observations so far, in recorded units.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// Appends the histogram as Prometheus text: cumulative `_bucket` series, `_sum`, `_count`.
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP streamfarm_{name} {help}");
        let _ = writeln!(out, "# TYPE streamfarm_{name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts[..=B::BOUNDS.len()].iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = match B::BOUNDS.get(i) {
                Some(bound) => (*bound as f64 / B::PER_UNIT).to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "streamfarm_{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 / B::PER_UNIT;
        let _ = writeln!(out, "streamfarm_{name}_sum {sum}");
        let _ = writeln!(out, "streamfarm_{name}_count {cumulative}");
    }
}

/// Records the time since `start` in a histogram of seconds.
pub(crate) fn observe_since(histogram: &Histogram<Seconds>, start: std::time::Instant) {
    histogram.observe(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
}

/// Records in a histogram of seconds the time since `unix_ms` (milliseconds since the Unix epoch,
/// likely on another machine's clock), 0 when that lies in this machine's future.
pub(crate) fn observe_since_unix_ms(histogram: &Histogram<Seconds>, unix_ms: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    histogram.observe(now.saturating_sub(unix_ms.saturating_mul(1_000)));
}

/// Adds one to a counter.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Subtracts one from a gauge.
pub(crate) fn dec(gauge: &AtomicU64) {
    gauge.fetch_sub(1, Ordering::Relaxed);
}

impl Metrics {
    /// Prometheus text exposition of these metrics, the relay queue depth and the farm as this
    /// node sees it.
    pub fn render(&self, farm: &FarmList, relay_queue_depth: u64, relay_links: u64) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP streamfarm_{name} {help}");
            let _ = writeln!(out, "# TYPE streamfarm_{name} {kind}");
            let _ = writeln!(out, "streamfarm_{name} {value}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "connections",
            "gauge",
            "Open streaming connections.",
            get(&self.connections),
        );
        metric(
            "sse_connections",
            "gauge",
            "Open streaming connections that are server-sent event streams.",
            get(&self.sse_connections),
        );
        metric(
            "connections_accepted_total",
            "counter",
            "Streaming connections accepted.",
            get(&self.connections_accepted),
        );
        metric(
            "connections_refused_total",
            "counter",
            "Streaming connections refused (full, draining or down).",
            get(&self.connections_refused),
        );
        metric(
            "subscriptions",
            "gauge",
            "Subscriptions held (connection x topic).",
            get(&self.subscriptions),
        );
        metric(
            "messages_published_total",
            "counter",
            "Messages published on this node.",
            get(&self.messages_published),
        );
        metric(
            "messages_delivered_total",
            "counter",
            "Message frames queued to local clients.",
            get(&self.messages_delivered),
        );
        metric(
            "messages_recovered_total",
            "counter",
            "Messages sent to resuming clients from history.",
            get(&self.messages_recovered),
        );
        metric(
            "publish_failures_total",
            "counter",
            "Publishes given up (not acknowledged in time, or too many waiting).",
            get(&self.publish_failures),
        );
        metric(
            "history_bytes",
            "gauge",
            "Bytes of topic history held for delivery and recovery.",
            get(&self.history_bytes),
        );
        metric(
            "relay_messages_in_total",
            "counter",
            "Messages received from peer nodes.",
            get(&self.relay_messages_in),
        );
        metric(
            "relay_messages_out_total",
            "counter",
            "Messages sent to peer nodes.",
            get(&self.relay_messages_out),
        );
        metric(
            "relay_drops_total",
            "counter",
            "Relay links reset because the peer could not keep up.",
            get(&self.relay_drops),
        );
        metric(
            "relay_queue_depth",
            "gauge",
            "Messages queued toward peer nodes and not yet written (relay lag).",
            relay_queue_depth,
        );
        metric(
            "relay_links",
            "gauge",
            "Relay links from peer nodes currently open.",
            relay_links,
        );
        metric(
            "slow_consumers_total",
            "counter",
            "Clients closed because their send queue was full.",
            get(&self.slow_consumers),
        );
        metric(
            "bad_frames_total",
            "counter",
            "Client frames that could not be parsed or served.",
            get(&self.bad_frames),
        );
        metric(
            "oversized_frames_total",
            "counter",
            "Client frames over max_frame_bytes.",
            get(&self.oversized_frames),
        );
        metric(
            "heartbeat_timeouts_total",
            "counter",
            "Connections closed because the client sent nothing within the heartbeat timeout.",
            get(&self.heartbeat_timeouts),
        );
        metric(
            "migrations_started_total",
            "counter",
            "Clients told to move to another server (rebalancing, drain, shutdown).",
            get(&self.migrations_started),
        );
        metric(
            "migrations_completed_total",
            "counter",
            "Clients told to move that left by themselves once resumed elsewhere.",
            get(&self.migrations_completed),
        );
        metric(
            "migrations_timed_out_total",
            "counter",
            "Clients told to move that were closed with 4000 at the deadline.",
            get(&self.migrations_timed_out),
        );
        metric(
            "migrations_closed_total",
            "counter",
            "Clients without the migrate feature closed with 4000 to move them.",
            get(&self.migrations_closed),
        );
        metric(
            "migrations_received_total",
            "counter",
            "Moved clients that arrived on this node.",
            get(&self.migrations_received),
        );
        metric(
            "rebalance_target",
            "gauge",
            "This node's fair share of the farm's users.",
            get(&self.rebalance_target),
        );
        metric(
            "auth_failures_total",
            "counter",
            "Credentials refused: missing, invalid or expired tokens; 401 answers.",
            get(&self.auth_failures),
        );
        metric(
            "auth_forbidden_total",
            "counter",
            "Valid credentials refused what they asked for: forbidden topics, 403 answers.",
            get(&self.auth_forbidden),
        );
        metric(
            "gossip_up",
            "gauge",
            "1 while this node gossips with the farm, 0 while its gossip is down.",
            get(&self.gossip_up),
        );
        metric(
            "gossip_failures_total",
            "counter",
            "Times gossip stopped on its own (socket error, panic) and was restarted.",
            get(&self.gossip_failures),
        );
        metric(
            "gossip_rejected_total",
            "counter",
            "Gossip datagrams dropped before decoding: failed authentication, or not gossip.",
            get(&self.gossip_rejected),
        );
        metric(
            "relay_auth_failures_total",
            "counter",
            "Relay links refused: failed handshake or interest over the limit; with NATS, frames refused: no or a bad tag, replayed, or too old.",
            get(&self.relay_auth_failures),
        );
        metric(
            "relay_disconnects_total",
            "counter",
            "Times the NATS relay lost its connection to NATS (it reconnects, then fetches what it missed).",
            get(&self.relay_disconnects),
        );
        metric(
            "resubscriptions_total",
            "counter",
            "Subscriptions resumed from positions (a client back after a failover or a move).",
            get(&self.resubscriptions),
        );
        self.publish_seconds.render(
            &mut out,
            "publish_seconds",
            "POST /publish from arrival to acknowledgement (stored on sequencer and replica, sent out).",
        );
        self.subscribe_seconds.render(
            &mut out,
            "subscribe_seconds",
            "A sub frame from arrival to its subscribed answer with the missed messages queued.",
        );
        self.migration_seconds.render(
            &mut out,
            "migration_seconds",
            "Clients told to move that left by themselves: from migrate to the old connection's close.",
        );
        self.delivery_seconds.render(
            &mut out,
            "delivery_seconds",
            "Messages delivered to local subscribers, once per message: from the sequencer's timestamp to queued to every subscriber (clock skew below 0 counts as 0).",
        );
        self.recovery_messages.render(
            &mut out,
            "recovery_messages",
            "Messages sent from history to a resuming subscription, per topic.",
        );
        let _ = writeln!(
            out,
            "# HELP streamfarm_farm_servers Servers in this node's farm list, by status."
        );
        let _ = writeln!(out, "# TYPE streamfarm_farm_servers gauge");
        for status in [Status::Up, Status::Draining, Status::Down] {
            let count = farm.servers.iter().filter(|s| s.status == status).count();
            let _ = writeln!(
                out,
                "streamfarm_farm_servers{{status=\"{status}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP streamfarm_farm_users Users of every server in this node's farm list."
        );
        let _ = writeln!(out, "# TYPE streamfarm_farm_users gauge");
        for server in &farm.servers {
            let _ = writeln!(
                out,
                "streamfarm_farm_users{{server=\"{}\",status=\"{}\"}} {}",
                escape_label(&server.name),
                server.status,
                server.users
            );
        }
        out
    }
}

/// Escapes a Prometheus label value.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamfarm_core::ServerEntry;

    #[test]
    fn render_is_prometheus_text() {
        let metrics = Metrics::default();
        inc(&metrics.connections);
        let farm = FarmList::new(vec![ServerEntry::new(
            "a\"",
            "ws://a/s",
            Status::Up,
            3,
            "A",
        )]);
        let text = metrics.render(&farm, 0, 0);
        assert!(text.contains("streamfarm_connections 1\n"));
        assert!(text.contains("streamfarm_farm_servers{status=\"UP\"} 1\n"));
        assert!(text.contains("streamfarm_farm_users{server=\"a\\\"\",status=\"UP\"} 3\n"));
    }

    #[test]
    fn histograms_are_cumulative_with_their_bounds_in_exported_units() {
        let metrics = Metrics::default();
        // 0.5 ms, 1 ms (on the bound: le is inclusive), 3 ms, 1 minute.
        for micros in [500, 1_000, 3_000, 60_000_000] {
            metrics.subscribe_seconds.observe(micros);
        }
        metrics.recovery_messages.observe(0);
        metrics.recovery_messages.observe(7);
        let text = metrics.render(&FarmList::new(Vec::new()), 0, 0);
        for line in [
            "# TYPE streamfarm_subscribe_seconds histogram\n",
            "streamfarm_subscribe_seconds_bucket{le=\"0.001\"} 2\n",
            "streamfarm_subscribe_seconds_bucket{le=\"0.0025\"} 2\n",
            "streamfarm_subscribe_seconds_bucket{le=\"0.005\"} 3\n",
            "streamfarm_subscribe_seconds_bucket{le=\"30\"} 3\n",
            "streamfarm_subscribe_seconds_bucket{le=\"+Inf\"} 4\n",
            "streamfarm_subscribe_seconds_sum 60.0045\n",
            "streamfarm_subscribe_seconds_count 4\n",
            "streamfarm_recovery_messages_bucket{le=\"0\"} 1\n",
            "streamfarm_recovery_messages_bucket{le=\"1\"} 1\n",
            "streamfarm_recovery_messages_bucket{le=\"10\"} 2\n",
            "streamfarm_recovery_messages_sum 7\n",
            "streamfarm_publish_seconds_count 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(metrics.subscribe_seconds.count(), 4);
    }
}
