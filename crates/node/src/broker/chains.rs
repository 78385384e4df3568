//! This node's part in every topic's chain, found by name or by partition: a claim covers a whole
//! partition, and must reach its topics without looking at every topic held.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::Chain;
use super::claims::Claim;
use super::placement::{PARTITIONS, partition};

/// One partition as this node sees it: the highest claim term it has seen, and its own claim.
#[derive(Default)]
pub(super) struct Part {
    /// Highest claim term seen: sequencers below it are refused, for every topic of the
    /// partition.
    pub(super) fenced: u64,
    /// The node that claimed the partition in `fenced` (or sequenced it in that term): its claim
    /// sent again in the same term is granted again.
    pub(super) holder: Option<String>,
    /// This node's claim of the partition, under way or done (then this node sequences it).
    pub(super) claim: Option<Claim>,
}

/// The chains, by topic, with an index of their topics by partition.
pub(super) struct Chains {
    by_topic: HashMap<String, Chain>,
    by_partition: Vec<HashSet<String>>,
}

impl Default for Chains {
    fn default() -> Self {
        Chains {
            by_topic: HashMap::new(),
            by_partition: vec![HashSet::new(); PARTITIONS],
        }
    }
}

impl Chains {
    /// The chain of `topic`, made empty if this node had none.
    pub(super) fn entry(&mut self, topic: &str) -> &mut Chain {
        if !self.by_topic.contains_key(topic) {
            self.by_partition[partition(topic)].insert(topic.to_string());
            self.by_topic.insert(topic.to_string(), Chain::default());
        }
        self.by_topic
            .get_mut(topic)
            .expect("the chain was inserted above")
    }

    pub(super) fn get(&self, topic: &str) -> Option<&Chain> {
        self.by_topic.get(topic)
    }

    pub(super) fn get_mut(&mut self, topic: &str) -> Option<&mut Chain> {
        self.by_topic.get_mut(topic)
    }

    pub(super) fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Chain)> {
        self.by_topic.iter()
    }

    /// The topics of `partition` this node has a chain of, in order (what the core sends from
    /// them goes in a stable order).
    pub(super) fn in_partition(&self, partition: usize) -> BTreeSet<String> {
        self.by_partition
            .get(partition)
            .map(|topics| topics.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether this node has a chain of some topic of `partition`.
    pub(super) fn holds_partition(&self, partition: usize) -> bool {
        self.by_partition
            .get(partition)
            .is_some_and(|topics| !topics.is_empty())
    }

    /// Keeps the chains for which `keep` is true.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str, &mut Chain) -> bool) {
        let by_partition = &mut self.by_partition;
        self.by_topic.retain(|topic, chain| {
            let kept = keep(topic, chain);
            if !kept {
                by_partition[partition(topic)].remove(topic);
            }
            kept
        });
    }
}
