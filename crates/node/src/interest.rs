//! A node's **interest** — the topics its clients subscribe to — as its peers learn it: a
//! versioned log of changes on the node that has it, and the set a peer holds of it.
//!
//! A relay link carries a node's interest to a peer (see `crate::relay`). With a million topics
//! of interest, neither sending the whole set again for every change nor once more after every
//! link reset is affordable, so:
//! - the node records each change of its topic set in an [`InterestLog`], under a version that
//!   grows by one per change of the set (one subscription of a thousand topics is one version);
//!   the log keeps the newest changes up to [`LOG_BYTES`] of topic names;
//! - a peer keeps what it learnt of the node's interest ([`PeerInterest`]) across link resets,
//!   with the node's run (a random number per process start) and the version it holds, and says
//!   so first on every new link (`interest_held`);
//! - the node then sends only the changes since that version when its log still holds them and
//!   the run is its own, and otherwise the whole set again, marked `reset` (the peer first forgets
//!   what it held);
//! - every frame carries at most [`FRAME_BYTES`] of topics ([`frames`]); all but the last carry the
//!   version the peer held before (0 for a reset: a link that ends in the middle of a reset leaves
//!   the peer holding an incomplete set that the next link replaces), the last the new version.
//!
//! Why replaying changes is safe after a link that ended in the middle of them: each change sets
//! or clears one topic, so applying the log from the version the peer held, in order, ends in the
//! node's set whatever prefix of it the peer had already applied.
//!
//! Pure: nothing here does I/O.

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

/// Most bytes of topic names the change log keeps; older changes are forgotten (a peer that held
/// a version older than the log is sent the whole set).
pub(crate) const LOG_BYTES: usize = 16 << 20;
/// Largest interest frame: a larger interest goes out in several frames, so that any interest a
/// node accepts can cross a link (one frame must fit the peer's frame limit).
pub(crate) const FRAME_BYTES: usize = 1 << 20;

/// One change of a node's topic set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    version: u64,
    added: bool,
    topic: Box<str>,
}

/// The newest changes of a node's interest (see the module docs).
#[derive(Debug)]
pub(crate) struct InterestLog {
    run: u64,
    version: u64,
    /// Changes of versions after `base`, oldest first.
    changes: VecDeque<Change>,
    /// Versions up to this one are no longer in `changes`.
    base: u64,
    bytes: usize,
    max_bytes: usize,
}

impl InterestLog {
    /// An empty interest of a node whose run is `run`, keeping `max_bytes` of changes.
    pub(crate) fn new(run: u64, max_bytes: usize) -> Self {
        InterestLog {
            run,
            version: 0,
            changes: VecDeque::new(),
            base: 0,
            bytes: 0,
            max_bytes,
        }
    }

    /// This node's run.
    pub(crate) fn run(&self) -> u64 {
        self.run
    }

    /// The current version.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// Records that `added` joined and `removed` left the set (each topic at most once, and a
    /// real change); returns the new version, or the current one when both are empty.
    pub(crate) fn record<'a>(
        &mut self,
        added: impl IntoIterator<Item = &'a str>,
        removed: impl IntoIterator<Item = &'a str>,
    ) -> u64 {
        let version = self.version + 1;
        let before = self.changes.len();
        for (is_added, topic) in added
            .into_iter()
            .map(|t| (true, t))
            .chain(removed.into_iter().map(|t| (false, t)))
        {
            self.bytes += topic.len();
            self.changes.push_back(Change {
                version,
                added: is_added,
                topic: topic.into(),
            });
        }
        if self.changes.len() == before {
            return self.version;
        }
        self.version = version;
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.changes.pop_front() else {
                break;
            };
            self.bytes -= oldest.topic.len();
            // A version is whole or gone: a peer at `base` gets every change after it.
            self.base = oldest.version;
            while self
                .changes
                .front()
                .is_some_and(|c| c.version == oldest.version)
            {
                if let Some(next) = self.changes.pop_front() {
                    self.bytes -= next.topic.len();
                }
            }
        }
        version
    }

    /// The changes that take a peer holding `version` of run `run` to the current version:
    /// `(added, removed)`; `None` when the log cannot (another run, a version it forgot, or one
    /// it never gave).
    pub(crate) fn since(&self, run: u64, version: u64) -> Option<(Vec<String>, Vec<String>)> {
        if run != self.run || version < self.base || version > self.version {
            return None;
        }
        // The last change of each topic decides: a topic added then removed is removed (the
        // frames carry removals and additions apart, so each topic must be in one of them).
        let mut last: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
        for change in self.changes.iter().filter(|c| c.version > version) {
            last.insert(&change.topic, change.added);
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (topic, is_added) in last {
            if is_added {
                added.push(topic.to_string());
            } else {
                removed.push(topic.to_string());
            }
        }
        Some((added, removed))
    }
}

/// An interest frame (dialer → acceptor on a relay link; documented in `docs/PROTOCOL.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct InterestFrame {
    /// The version the peer holds once it has applied this frame (see [`frames`]).
    pub(crate) version: u64,
    /// The sender's run.
    #[serde(default)]
    pub(crate) run: u64,
    /// Forget everything held first: the whole set follows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) reset: bool,
    #[serde(default)]
    pub(crate) add: Vec<String>,
    #[serde(default)]
    pub(crate) remove: Vec<String>,
}

/// The frames that take a peer holding `held` to `version`: the changes `add` and `remove` on top
/// of what it holds, or, with `reset`, the whole set `add`. Each holds at most [`FRAME_BYTES`] of
/// topics; all but the last carry `held` (0 with `reset`), the last `version`.
pub(crate) fn frames(
    run: u64,
    held: u64,
    version: u64,
    reset: bool,
    add: Vec<String>,
    remove: Vec<String>,
) -> Vec<InterestFrame> {
    frames_within(FRAME_BYTES, run, held, version, reset, add, remove)
}

/// [`frames`], each holding at most `limit` bytes of topics (at least one topic).
fn frames_within(
    limit: usize,
    run: u64,
    held: u64,
    version: u64,
    reset: bool,
    add: Vec<String>,
    remove: Vec<String>,
) -> Vec<InterestFrame> {
    // Removals first (they only shrink the peer's interest), then additions.
    let mut items: Vec<(bool, String)> = remove.into_iter().map(|t| (false, t)).collect();
    items.extend(add.into_iter().map(|t| (true, t)));
    let mut frames = Vec::new();
    let mut items = items.into_iter().peekable();
    loop {
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        while let Some((_, topic)) = items.peek() {
            // A topic costs at most its JSON string (6 bytes per byte if every byte were
            // escaped as `\u00XX`), its quotes and a comma.
            let cost = topic.len() * 6 + 3;
            if bytes + cost > limit && bytes > 0 {
                break;
            }
            bytes += cost;
            let (adding, topic) = items.next().expect("peeked");
            if adding {
                add.push(topic);
            } else {
                remove.push(topic);
            }
        }
        let last = items.peek().is_none();
        frames.push(InterestFrame {
            version: if last {
                version
            } else if reset {
                0
            } else {
                held
            },
            run,
            reset: reset && frames.is_empty(),
            add,
            remove,
        });
        if last {
            return frames;
        }
    }
}

/// What a peer holds of a node's interest, kept across the links between them.
#[derive(Debug, Default)]
pub(crate) struct PeerInterest {
    /// The node's run this was learnt from (0: nothing learnt yet).
    pub(crate) run: u64,
    /// The version held (0: none, or an incomplete set).
    pub(crate) version: u64,
    pub(crate) topics: HashSet<String>,
}

impl PeerInterest {
    /// Applies `frame`; the version now held.
    pub(crate) fn apply(&mut self, frame: InterestFrame) -> u64 {
        if frame.reset || frame.run != self.run {
            self.topics.clear();
        }
        self.run = frame.run;
        for topic in &frame.remove {
            self.topics.remove(topic);
        }
        self.topics.extend(frame.add);
        self.version = frame.version;
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A node: its set and its log.
    struct Node {
        set: HashSet<String>,
        log: InterestLog,
    }

    impl Node {
        fn new(run: u64, max_bytes: usize) -> Self {
            Node {
                set: HashSet::new(),
                log: InterestLog::new(run, max_bytes),
            }
        }

        /// Flips `topics` in the set (adds those absent, removes those present).
        fn flip(&mut self, topics: &[String]) {
            let mut seen = HashSet::new();
            let (mut added, mut removed) = (Vec::new(), Vec::new());
            for topic in topics.iter().filter(|t| seen.insert(t.as_str())) {
                if self.set.remove(topic) {
                    removed.push(topic.as_str());
                } else {
                    self.set.insert(topic.clone());
                    added.push(topic.as_str());
                }
            }
            self.log.record(added, removed);
        }

        /// The frames a new link sends a peer that says it holds `held`, each at most `limit`
        /// bytes of topics.
        fn frames_for(&self, held: &PeerInterest, limit: usize) -> Vec<InterestFrame> {
            match self.log.since(held.run, held.version) {
                Some((add, remove)) => frames_within(
                    limit,
                    self.log.run(),
                    held.version,
                    self.log.version(),
                    false,
                    add,
                    remove,
                ),
                None => frames_within(
                    limit,
                    self.log.run(),
                    0,
                    self.log.version(),
                    true,
                    self.set.iter().cloned().collect(),
                    Vec::new(),
                ),
            }
        }
    }

    fn topic() -> impl Strategy<Value = String> {
        (0u32..60).prop_map(|i| format!("topic.{i}.{}", "x".repeat((i % 7) as usize)))
    }

    #[test]
    fn a_large_interest_is_split_into_frames_that_each_fit() {
        let add: Vec<String> = (0..100_000).map(|i| format!("topic-{i:08}")).collect();
        let out = frames(1, 3, 9, false, add.clone(), vec!["gone".into()]);
        assert!(out.len() > 1);
        for (i, frame) in out.iter().enumerate() {
            let text = serde_json::to_string(frame).unwrap();
            assert!(
                text.len() <= FRAME_BYTES + 256,
                "frame of {} bytes",
                text.len()
            );
            assert_eq!(frame.version, if i + 1 == out.len() { 9 } else { 3 });
        }
        let sent: Vec<String> = out.iter().flat_map(|f| f.add.clone()).collect();
        assert_eq!(sent, add);
        assert_eq!(out[0].remove, vec!["gone".to_string()]);
        assert_eq!(frames(1, 1, 2, false, vec![], vec![]).len(), 1);
    }

    #[test]
    fn a_forgotten_version_another_run_or_a_future_version_needs_the_whole_set() {
        let mut node = Node::new(7, 40);
        node.flip(&["a".repeat(30)]);
        let v1 = node.log.version();
        assert_eq!(node.log.since(7, 0), Some((vec!["a".repeat(30)], vec![])));
        node.flip(&["b".repeat(30)]);
        // 60 bytes of changes over a 40-byte log: the first change is gone.
        assert_eq!(node.log.since(7, 0), None);
        assert_eq!(node.log.since(7, v1), Some((vec!["b".repeat(30)], vec![])));
        assert_eq!(node.log.since(8, v1), None);
        assert_eq!(node.log.since(7, v1 + 5), None);
    }

    proptest! {
        /// Whatever the changes, the log's size, the frames' cut and where links end (the peer
        /// keeping a prefix of the frames, or forgetting everything), the peer ends up with the
        /// node's set once a link completes.
        #[test]
        fn chunked_interest_reassembles_to_the_same_set(
            steps in proptest::collection::vec(
                (proptest::collection::vec(topic(), 0..40), 0usize..4, any::<bool>()),
                1..25,
            ),
            log_bytes in 0usize..2000,
            frame_bytes in 1usize..400,
            restart_at in proptest::option::of(0usize..25),
        ) {
            let mut node = Node::new(1, log_bytes);
            let mut peer = PeerInterest::default();
            for (i, (topics, cut, forget)) in steps.into_iter().enumerate() {
                if restart_at == Some(i) {
                    // The node restarts: a new run, an empty set.
                    node = Node::new(2 + i as u64, log_bytes);
                }
                node.flip(&topics);
                if forget {
                    peer = PeerInterest::default();
                }
                // A link: the peer says what it holds, then takes some of the frames before the
                // link ends (`cut` of them, all when `cut` is 0).
                let out = node.frames_for(&peer, frame_bytes);
                let keep = if cut == 0 { out.len() } else { cut.min(out.len()) };
                for frame in out.into_iter().take(keep) {
                    peer.apply(frame);
                }
            }
            // A last link that completes.
            for frame in node.frames_for(&peer, frame_bytes) {
                peer.apply(frame);
            }
            prop_assert_eq!(peer.version, node.log.version());
            prop_assert_eq!(peer.run, node.log.run());
            prop_assert_eq!(&peer.topics, &node.set);
        }
    }
}
