//! The guarantees a simulated run checks, and the publishers' history they are checked against.
//!
//! - every acknowledged publish is in every node's delivery stream exactly once, at its
//!   acknowledged position, in order, with no hole (a node's stream stands for what its
//!   subscribers are sent);
//! - no stream holds a message nobody published, or one message twice (a publish sent again
//!   under its key included);
//! - an offset of an epoch is never given to two messages;
//! - no two nodes sequence a topic in the same term;
//! - once every fault has healed, every topic has one sequencer, and publishing works again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use streamfarm_core::protocol::Position;
use tokio::sync::oneshot::error::TryRecvError;

use super::PlannedPublish;
use super::farm::{Reply, SimFarm};

/// A broken guarantee: which, and what was seen.
pub(crate) type Broken = (&'static str, String);

/// One publish, as its publisher saw it.
struct Sent {
    topic: String,
    data: String,
    key: Option<String>,
    node: usize,
    sent_at: u64,
    replies: Vec<Reply>,
    tries: u32,
    position: Option<Position>,
    /// Sent by the final check, not by the run's publishers.
    check: bool,
}

/// What the publishers sent and were answered.
#[derive(Default)]
pub(crate) struct History {
    sent: Vec<Sent>,
    /// The publishes still waiting for an answer, by index into `sent`.
    waiting: Vec<usize>,
    /// Acknowledged positions: (topic, epoch, offset) → data.
    acked: BTreeMap<(String, u64, u64), String>,
    /// Data published per topic.
    published: HashMap<String, BTreeSet<String>>,
    pub(crate) retries: usize,
}

/// The first running node from `from` on, if any.
fn running_from(farm: &SimFarm, from: usize) -> Option<usize> {
    let size = farm.nodes.len();
    (0..size)
        .map(|k| (from + k) % size)
        .find(|i| farm.running(*i))
}

impl History {
    /// Publishes the run's publish number `n` (through another node if its own is down).
    pub(crate) fn publish(
        &mut self,
        farm: &mut SimFarm,
        n: usize,
        planned: &PlannedPublish,
        topics: &[String],
    ) {
        let Some(node) = running_from(farm, planned.node) else {
            return;
        };
        let topic = topics[planned.topic % topics.len()].clone();
        let data = format!("p{n}");
        let key = planned.keyed.then(|| format!("k{n}"));
        self.send(farm, node, topic, data, key);
    }

    fn send(
        &mut self,
        farm: &mut SimFarm,
        node: usize,
        topic: String,
        data: String,
        key: Option<String>,
    ) {
        let reply = farm.publish(node, &topic, &data, key.clone());
        self.published
            .entry(topic.clone())
            .or_default()
            .insert(data.clone());
        self.waiting.push(self.sent.len());
        self.sent.push(Sent {
            topic,
            data,
            key,
            node,
            sent_at: farm.ms,
            replies: vec![reply],
            tries: 1,
            position: None,
            check: false,
        });
    }

    /// When the next keyed publish left unanswered is due to be sent again.
    pub(crate) fn next_retry(&self, after: u64) -> Option<u64> {
        self.waiting
            .iter()
            .map(|k| &self.sent[*k])
            .filter(|s| s.key.is_some() && s.position.is_none() && s.tries < 3)
            .map(|s| s.sent_at + after)
            .min()
    }

    /// A keyed publish unanswered for `after` ms is sent again through the next running node.
    pub(crate) fn retry(&mut self, farm: &mut SimFarm, after: u64) {
        for k in &self.waiting {
            let sent = &mut self.sent[*k];
            if sent.key.is_none()
                || sent.position.is_some()
                || sent.tries >= 3
                || farm.ms < sent.sent_at + after
            {
                continue;
            }
            let Some(node) = running_from(farm, sent.node + 1) else {
                continue;
            };
            sent.node = node;
            sent.sent_at = farm.ms;
            sent.tries += 1;
            sent.replies
                .push(farm.publish(node, &sent.topic, &sent.data, sent.key.clone()));
            self.retries += 1;
        }
    }

    /// Takes in the answers that came; an offset given twice breaks a guarantee.
    pub(crate) fn collect_replies(&mut self) -> Result<(), Broken> {
        let mut still = Vec::with_capacity(self.waiting.len());
        for index in std::mem::take(&mut self.waiting) {
            let sent = &mut self.sent[index];
            let mut k = 0;
            while k < sent.replies.len() {
                match sent.replies[k].try_recv() {
                    Err(TryRecvError::Empty) => {
                        k += 1;
                        continue;
                    }
                    Ok(Ok(position)) => {
                        if let Some(before) = sent.position
                            && before != position
                        {
                            return Err((
                                "a publish sent again under its key was numbered twice",
                                format!(
                                    "{} ({:?}) acknowledged at {before} and at {position}",
                                    sent.data, sent.key
                                ),
                            ));
                        }
                        sent.position = Some(position);
                        let at = (sent.topic.clone(), position.epoch.0, position.offset);
                        if let Some(other) = self.acked.get(&at)
                            && *other != sent.data
                        {
                            return Err((
                                "an offset of an epoch was given to two messages",
                                format!(
                                    "{} and {other} both acknowledged at {position} of {}",
                                    sent.data, sent.topic
                                ),
                            ));
                        }
                        self.acked.insert(at, sent.data.clone());
                    }
                    Ok(Err(_)) | Err(TryRecvError::Closed) => {}
                }
                sent.replies.remove(k);
            }
            if !sent.replies.is_empty() {
                still.push(index);
            }
        }
        self.waiting = still;
        Ok(())
    }

    /// Publishes acknowledged.
    pub(crate) fn acknowledged(&self) -> usize {
        self.sent
            .iter()
            .filter(|s| !s.check && s.position.is_some())
            .count()
    }
}

/// No two nodes sequence a topic in the same term.
pub(crate) fn one_sequencer_per_term(farm: &SimFarm) -> Result<(), Broken> {
    let mut seen: HashMap<(&str, u64), usize> = HashMap::new();
    for (i, node) in farm.nodes.iter().enumerate() {
        let Some(core) = &node.core else { continue };
        for (topic, term) in core.sequencing() {
            if let Some(other) = seen.insert((topic, term), i) {
                return Err((
                    "two nodes sequence a topic in the same term",
                    format!(
                        "n{} and n{} sequence {topic} in term {term}",
                        other + 1,
                        i + 1
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// After every fault healed: publishing works on every topic through every node, each topic has
/// one sequencer, and every node's stream holds every acknowledged publish once, in order.
pub(crate) fn at_the_end(
    farm: &mut SimFarm,
    history: &mut History,
    topics: &[String],
) -> Result<(), Broken> {
    let first_final = history.sent.len();
    for topic in topics {
        for node in 0..farm.nodes.len() {
            let data = format!("final-{topic}-n{}", node + 1);
            history.send(farm, node, topic.clone(), data, None);
            if let Some(sent) = history.sent.last_mut() {
                sent.check = true;
            }
        }
    }
    farm.run_for(super::SETTLE_MS);
    history.collect_replies()?;
    if let Some(sent) = history.sent[first_final..]
        .iter()
        .find(|s| s.position.is_none())
    {
        return Err((
            "publishing did not work again once every fault healed",
            format!(
                "{} on {} through n{} not acknowledged",
                sent.data,
                sent.topic,
                sent.node + 1
            ),
        ));
    }
    one_sequencer_per_term(farm)?;
    for topic in topics {
        let sequencers: Vec<usize> = (0..farm.nodes.len())
            .filter(|i| {
                farm.nodes[*i]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.sequencing().any(|(t, _)| t == topic))
            })
            .collect();
        if sequencers.len() != 1 {
            return Err((
                "not one sequencer per topic once every fault healed",
                format!("{topic} sequenced by {sequencers:?}"),
            ));
        }
    }
    for (i, _) in farm.nodes.iter().enumerate() {
        for topic in topics {
            check_stream(farm, history, i, topic)?;
        }
    }
    Ok(())
}

/// Node `i`'s stream of `topic` against the history.
fn check_stream(farm: &SimFarm, history: &History, i: usize, topic: &str) -> Result<(), Broken> {
    let node = format!("n{}", i + 1);
    let Some((epoch, entries)) = farm.delivered(i, topic) else {
        return Err((
            "a node delivers nothing of a topic once every fault healed",
            format!("{node} has no stream of {topic}"),
        ));
    };
    let published = history.published.get(topic);
    let mut seen = BTreeSet::new();
    for pair in entries.windows(2) {
        if pair[1].0 != pair[0].0 + 1 {
            return Err((
                "a hole in a node's stream once every fault healed",
                format!("{node}'s {topic} goes from {} to {}", pair[0].0, pair[1].0),
            ));
        }
    }
    for (offset, data) in &entries {
        if !published.is_some_and(|p| p.contains(data)) {
            return Err((
                "a node delivered a message nobody published",
                format!("{node}'s {topic} has {data:?} at {offset}"),
            ));
        }
        if !seen.insert(data.as_str()) {
            return Err((
                "a node delivered a message twice",
                format!("{node}'s {topic} has {data} twice"),
            ));
        }
        if let Some(acked) = history.acked.get(&(topic.to_string(), epoch, *offset))
            && acked != data
        {
            return Err((
                "a node delivered another message at an acknowledged position",
                format!("{node}'s {topic} has {data} at {offset}, acknowledged for {acked}"),
            ));
        }
    }
    let first = entries.first().map_or(u64::MAX, |e| e.0);
    for ((t, e, offset), data) in &history.acked {
        if t != topic {
            continue;
        }
        if *e != epoch {
            return Err((
                "an acknowledged message's epoch was lost",
                format!(
                    "{data} acknowledged in epoch {e} of {topic}; {node} delivers epoch {epoch}"
                ),
            ));
        }
        if *offset >= first && !entries.iter().any(|(o, d)| o == offset && d == data) {
            return Err((
                "an acknowledged message is missing from a node's stream",
                format!("{data} at {offset} of {topic} not delivered by {node}"),
            ));
        }
    }
    Ok(())
}
