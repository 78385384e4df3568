//! Catching up: what a node asks of every live node after a partition heals or a relay link opens
//! again, for every topic it delivers.
//!
//! While a node was cut off, or its link to a peer was down, messages may have gone out that it
//! never saw, and a message missed at the end of a topic shows no hole until the next one. So the
//! node sends every live node the position of every topic it delivers, and each answers with what
//! it holds *after* that position, if anything: a digest comparison, so the answers carry only
//! what changed. A farm of a million topics must not turn this into a million frames (they
//! overflowed the link's queue, the link was reset, and the catch-up that followed the reset
//! overflowed it again, for ever), so:
//! - positions travel [`TOPICS_PER_FRAME`] to a `catch_up` frame, and answers are cut into
//!   `catch_up_reply` frames of at most about [`REPLY_BYTES`] (the last one says `done`);
//! - at most [`WINDOW`] chunks are under way at once: the next goes out when one is answered by
//!   every live node, or given up at its deadline;
//! - a chunk not answered by a node is sent to it again after the fetch resend delay, until the
//!   chunk's deadline (a link that looked open may have been one a partition left dead).
//!
//! Pure: time is passed in, and what to send is returned.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use streamfarm_core::protocol::Position;

use tracing::debug;

use super::wire::{LogState, PeerFrame};
use super::{CATCH_UP_AGAIN, FETCH_WAIT, RESEND_AFTER};

/// Topics per `catch_up` frame: about 50 KiB of names and positions.
pub(crate) const TOPICS_PER_FRAME: usize = 1024;
/// Chunks under way at once.
pub(crate) const WINDOW: usize = 4;
/// Bytes of history (payloads and names) after which an answer goes on in another frame.
pub(crate) const REPLY_BYTES: usize = 512 * 1024;

/// One chunk of positions, asked of every live node.
#[derive(Debug)]
struct Chunk {
    topics: Vec<(String, Position)>,
    /// The nodes that answered it whole.
    answered: HashSet<String>,
    /// When it was last sent to the nodes that had not answered.
    sent_at: Instant,
    deadline: Instant,
}

/// The catch-ups under way (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct CatchUps {
    /// Chunks not sent yet.
    queued: VecDeque<Vec<(String, Position)>>,
    /// Chunks sent, by request number.
    in_flight: BTreeMap<u64, Chunk>,
    next_request: u64,
}

impl CatchUps {
    /// Starts catching up `positions`. Chunks of an earlier catch-up not sent yet are dropped:
    /// these positions are newer.
    pub(crate) fn start(&mut self, mut positions: Vec<(String, Position)>) {
        self.queued.clear();
        while !positions.is_empty() {
            let rest = positions.split_off(positions.len().min(TOPICS_PER_FRAME));
            self.queued.push_back(positions);
            positions = rest;
        }
    }

    /// Whether nothing is queued or under way.
    pub(crate) fn is_idle(&self) -> bool {
        self.queued.is_empty() && self.in_flight.is_empty()
    }

    /// What to send at `now` to the live peers `peers` (this node left out): chunks given up at
    /// their deadline are dropped, chunks answered by every peer are done, unanswered ones are
    /// sent again after `resend`, and new ones go out while fewer than [`WINDOW`] are under way.
    pub(crate) fn due(
        &mut self,
        now: Instant,
        peers: &[String],
        resend: Duration,
        wait: Duration,
    ) -> Vec<(String, PeerFrame)> {
        let mut out = Vec::new();
        self.in_flight.retain(|_, chunk| {
            now < chunk.deadline && peers.iter().any(|p| !chunk.answered.contains(p))
        });
        for (request, chunk) in &mut self.in_flight {
            if now.duration_since(chunk.sent_at) < resend {
                continue;
            }
            chunk.sent_at = now;
            for peer in peers.iter().filter(|p| !chunk.answered.contains(*p)) {
                out.push((peer.clone(), frame(*request, &chunk.topics)));
            }
        }
        while self.in_flight.len() < WINDOW && !peers.is_empty() {
            let Some(topics) = self.queued.pop_front() else {
                break;
            };
            self.next_request += 1;
            let request = self.next_request;
            for peer in peers {
                out.push((peer.clone(), frame(request, &topics)));
            }
            self.in_flight.insert(
                request,
                Chunk {
                    topics,
                    answered: HashSet::new(),
                    sent_at: now,
                    deadline: now + wait,
                },
            );
        }
        if peers.is_empty() {
            // Nobody to ask: nothing to catch up from.
            self.queued.clear();
            self.in_flight.clear();
        }
        out
    }

    /// `from` answered chunk `request` whole.
    pub(crate) fn answered(&mut self, from: &str, request: u64) {
        if let Some(chunk) = self.in_flight.get_mut(&request) {
            chunk.answered.insert(from.to_string());
        }
    }
}

fn frame(request: u64, topics: &[(String, Position)]) -> PeerFrame {
    PeerFrame::CatchUp {
        request,
        topics: topics.to_vec(),
    }
}

/// The `catch_up_reply` frames that answer `request` with `states`: cut after about
/// [`REPLY_BYTES`], the last one `done` (there is always one, empty when nothing is newer).
pub(crate) fn reply_frames(request: u64, states: Vec<(String, LogState)>) -> Vec<PeerFrame> {
    let pieces = cut(states);
    let last = pieces.len() - 1;
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, states)| PeerFrame::CatchUpReply {
            request,
            states,
            done: i == last,
        })
        .collect()
}

/// `states` cut into pieces of about [`REPLY_BYTES`] each, for the frames that carry many
/// topics' histories (catch-up and claim answers); always one piece, empty when `states` is.
pub(crate) fn cut(states: Vec<(String, LogState)>) -> Vec<Vec<(String, LogState)>> {
    let mut pieces = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for (topic, state) in states {
        bytes += topic.len()
            + 64
            + state
                .entries
                .iter()
                .map(|e| e.data.len() + e.id.origin.len() + 64)
                .sum::<usize>();
        current.push((topic, state));
        if bytes >= REPLY_BYTES {
            pieces.push(std::mem::take(&mut current));
            bytes = 0;
        }
    }
    if !current.is_empty() || pieces.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// Whether `state` holds something after `after`: later messages of the same epoch, or a newer
/// epoch.
pub(crate) fn is_newer(state: &LogState, after: Position) -> bool {
    state.epoch > after.epoch || (state.epoch == after.epoch && state.last > after.offset)
}

/// Catching up, as the broker's core does it.
impl super::Core {
    /// A peer's link ended or opened again. Once one opens again, what went out while it was
    /// down may have missed this node, and a message missed at the end of a topic shows no hole
    /// until the next one: every topic delivered here is fetched after its position, now and
    /// once more [`CATCH_UP_AGAIN`] later (for what went out while the peers learned this node's
    /// interest again).
    pub(super) fn links_ended(&mut self, ended: HashSet<String>) {
        let reopened = self.ended.iter().any(|peer| !ended.contains(peer));
        self.ended = ended;
        self.view_changed();
        if reopened {
            self.catch_up_all();
            self.catch_up_at = Some(self.now + CATCH_UP_AGAIN);
        }
    }

    /// Fetches every topic delivered here after its stream's position, from every live node,
    /// merging every answer: after a partition or a link reset, the topic's replica in this
    /// node's view may not be the node that holds what went out meanwhile.
    pub(super) fn catch_up_all(&mut self) {
        let mut positions = self.hub.positions();
        // In a stable order: the same inputs send the same frames (see the module docs of
        // `broker`).
        positions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        debug!(topics = positions.len(), "catching up from every live node");
        self.catch_ups.start(positions);
        self.pump_catch_ups(self.now);
    }

    /// Sends the catch-up frames due now (see [`catch_up::CatchUps::due`]).
    pub(super) fn pump_catch_ups(&mut self, now: Instant) {
        if self.catch_ups.is_idle() {
            return;
        }
        let peers: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect();
        for (peer, frame) in self.catch_ups.due(now, &peers, RESEND_AFTER, FETCH_WAIT) {
            self.send(&peer, frame);
        }
    }

    /// Answers a catch-up: the topics whose history here goes beyond the position asked.
    pub(super) fn on_catch_up(
        &mut self,
        from: &str,
        request: u64,
        topics: Vec<(String, Position)>,
    ) {
        let states: Vec<(String, LogState)> = topics
            .into_iter()
            .filter_map(|(topic, after)| {
                let state = self.fetch_state(&topic, Some(after))?;
                is_newer(&state, after).then_some((topic, state))
            })
            .collect();
        for frame in reply_frames(request, states) {
            self.send(from, frame);
        }
    }

    pub(super) fn on_catch_up_reply(
        &mut self,
        from: &str,
        request: u64,
        states: Vec<(String, LogState)>,
        done: bool,
    ) {
        for (topic, state) in states {
            debug!(%topic, %from, last = state.last, "catch-up answer");
            self.hub.merge(&topic, &state, &mut self.wakes);
        }
        if done {
            self.catch_ups.answered(from, request);
            self.pump_catch_ups(self.now);
        }
    }

    /// Catching up: the second round after links reopened, and the frames due.
    pub(super) fn catch_up_due(&mut self, now: Instant) {
        if self.catch_up_at.is_some_and(|at| now >= at) {
            self.catch_up_at = None;
            self.catch_up_all();
        }
        self.pump_catch_ups(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::log::PublishId;
    use crate::broker::wire::WireEntry;
    use streamfarm_core::protocol::{Encoding, Epoch};

    fn positions(n: usize) -> Vec<(String, Position)> {
        (0..n)
            .map(|i| (format!("t{i}"), Position::new(Epoch(7), i as u64)))
            .collect()
    }

    fn peers() -> Vec<String> {
        vec!["b".to_string(), "c".to_string()]
    }

    const RESEND: Duration = Duration::from_millis(300);
    const WAIT: Duration = Duration::from_secs(2);

    fn asked(frames: &[(String, PeerFrame)]) -> usize {
        frames
            .iter()
            .map(|(_, f)| match f {
                PeerFrame::CatchUp { topics, .. } => topics.len(),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_million_topics_go_out_in_bounded_frames_a_window_at_a_time() {
        let mut catch_ups = CatchUps::default();
        catch_ups.start(positions(1_000_000));
        let now = Instant::now();
        let first = catch_ups.due(now, &peers(), RESEND, WAIT);
        // WINDOW chunks, each to both peers, none larger than TOPICS_PER_FRAME.
        assert_eq!(first.len(), WINDOW * 2);
        assert_eq!(asked(&first), WINDOW * TOPICS_PER_FRAME * 2);
        // Nothing more until a chunk is answered by both.
        assert!(catch_ups.due(now, &peers(), RESEND, WAIT).is_empty());
        let PeerFrame::CatchUp { request, .. } = &first[0].1 else {
            panic!("a catch_up frame")
        };
        catch_ups.answered("b", *request);
        assert!(catch_ups.due(now, &peers(), RESEND, WAIT).is_empty());
        catch_ups.answered("c", *request);
        assert_eq!(
            asked(&catch_ups.due(now, &peers(), RESEND, WAIT)),
            2 * TOPICS_PER_FRAME
        );
    }

    #[test]
    fn unanswered_chunks_are_sent_again_then_given_up() {
        let mut catch_ups = CatchUps::default();
        catch_ups.start(positions(10));
        let now = Instant::now();
        let first = catch_ups.due(now, &peers(), RESEND, WAIT);
        let PeerFrame::CatchUp { request, .. } = &first[0].1 else {
            panic!("a catch_up frame")
        };
        catch_ups.answered("b", *request);
        let again = catch_ups.due(now + RESEND, &peers(), RESEND, WAIT);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, "c");
        assert!(catch_ups.due(now + WAIT, &peers(), RESEND, WAIT).is_empty());
        assert!(catch_ups.is_idle());
    }

    #[test]
    fn a_new_catch_up_replaces_the_chunks_not_sent() {
        let mut catch_ups = CatchUps::default();
        catch_ups.start(positions(TOPICS_PER_FRAME * (WINDOW + 3)));
        let now = Instant::now();
        catch_ups.due(now, &peers(), RESEND, WAIT);
        catch_ups.start(positions(1));
        // The window is full of the first catch-up's chunks; the new one waits its turn.
        assert_eq!(catch_ups.queued.len(), 1);
        assert!(catch_ups.due(now, &[], RESEND, WAIT).is_empty());
        assert!(catch_ups.is_idle());
    }

    #[test]
    fn answers_are_cut_by_bytes_and_end_done() {
        let big = LogState {
            epoch: Epoch(7),
            last: 1,
            entries: vec![WireEntry {
                offset: 1,
                id: PublishId::default(),
                data: "x".repeat(REPLY_BYTES / 3),
                encoding: Encoding::Utf8,
                ts: None,
            }],
        };
        let states: Vec<(String, LogState)> =
            (0..7).map(|i| (format!("t{i}"), big.clone())).collect();
        let frames = reply_frames(9, states);
        assert_eq!(frames.len(), 3);
        let mut count = 0;
        for (i, frame) in frames.iter().enumerate() {
            let PeerFrame::CatchUpReply {
                request,
                states,
                done,
            } = frame
            else {
                panic!("a catch_up_reply frame")
            };
            assert_eq!(*request, 9);
            assert_eq!(*done, i == frames.len() - 1);
            count += states.len();
        }
        assert_eq!(count, 7);
        assert_eq!(reply_frames(3, Vec::new()).len(), 1);
    }

    #[test]
    fn newer_means_a_later_offset_or_epoch() {
        let state = LogState {
            epoch: Epoch(7),
            last: 5,
            entries: Vec::new(),
        };
        assert!(is_newer(&state, Position::new(Epoch(7), 4)));
        assert!(!is_newer(&state, Position::new(Epoch(7), 5)));
        assert!(is_newer(&state, Position::new(Epoch(6), 9)));
        assert!(!is_newer(&state, Position::new(Epoch(8), 0)));
    }
}
