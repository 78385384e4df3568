//! Which node sequences a topic, and which holds its replica: rendezvous hashing over the live
//! nodes of the farm list.
//!
//! Every node ranks the live nodes by `score(topic, node)` and reads the same answer off the same
//! list: the first is the topic's **sequencer** (it gives each message its offset), the second its
//! **replica** (it stores each message before any client sees it, then sends it out). Why
//! rendezvous hashing: a node that leaves moves only the topics it held, and the one that takes
//! over a topic whose sequencer died is exactly its replica — the second of the same ranking —
//! which already holds the topic's history. A node that joins takes over only the topics it now
//! ranks first or second for.
//!
//! # Partitions
//! A topic is placed through its **partition**: topics hash into [`PARTITIONS`] partitions, and
//! the nodes are ranked per partition, not per topic. Every topic of a partition has the same
//! sequencer and replica, so a node keeps one placement per partition whatever the number of
//! topics (a table of a few thousand entries, rebuilt when the farm changes, instead of a cache of
//! one entry per topic that thrashed beyond 65 536 topics), and a node that leaves or joins moves
//! whole partitions. With 4 096 partitions a farm of up to a few hundred nodes still spreads its
//! topics evenly (every node ranks first for about 4 096 / N partitions).
//!
//! Pure: the list is passed in.

use streamfarm_core::{FarmList, Status};

/// The sequencer and the replica of a topic (the same node when only one is live).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Gives offsets.
    pub(crate) sequencer: String,
    /// Stores, then sends out.
    pub(crate) replica: String,
}

/// The nodes that may hold a topic: every node of `list` not listed `DOWN`.
pub(crate) fn live_nodes(list: &FarmList) -> Vec<String> {
    list.servers
        .iter()
        .filter(|s| s.status != Status::Down)
        .map(|s| s.name.clone())
        .collect()
}

/// Partitions the topics hash into (see the module docs).
pub(crate) const PARTITIONS: usize = 4096;

/// The partition of `topic`: FNV-1a of its name, mixed, modulo [`PARTITIONS`] (stable across
/// builds and platforms).
pub(crate) fn partition(topic: &str) -> usize {
    (mix(fnv(0xcbf2_9ce4_8422_2325, topic.bytes())) % PARTITIONS as u64) as usize
}

/// The placement of `topic` over `nodes`; `None` when there is no node.
pub(crate) fn place(topic: &str, nodes: &[String]) -> Option<Placement> {
    place_partition(partition(topic), nodes)
}

/// The placement of every topic of partition `partition` over `nodes`; `None` when there is no
/// node.
pub(crate) fn place_partition(partition: usize, nodes: &[String]) -> Option<Placement> {
    let key = partition.to_le_bytes();
    let mut ranked: Vec<(u64, &String)> = nodes.iter().map(|n| (score(&key, n), n)).collect();
    // Highest score first; names break (astronomically unlikely) ties the same way everywhere.
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let sequencer = ranked.first()?.1.clone();
    let replica = ranked.get(1).map_or(sequencer.clone(), |r| r.1.clone());
    Some(Placement { sequencer, replica })
}

/// A stable 64-bit score of (partition, node): FNV-1a over both, then a final mix so that nearby
/// inputs spread. Stable across builds and platforms, unlike `std`'s hasher.
fn score(partition: &[u8], node: &str) -> u64 {
    let bytes = partition.iter().copied().chain([0xff]).chain(node.bytes());
    mix(fnv(0xcbf2_9ce4_8422_2325, bytes))
}

/// FNV-1a of `bytes` from `hash`.
fn fnv(mut hash: u64, bytes: impl Iterator<Item = u8>) -> u64 {
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// splitmix64's finalizer: nearby inputs spread.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/PROTOCOL.md's example frames name this partition for the topic `prices`.
    #[test]
    fn the_documented_partition_of_prices() {
        assert_eq!(partition("prices"), 2998);
    }

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn losing_the_sequencer_promotes_its_replica() {
        let all = nodes(&["a", "b", "c", "d", "e"]);
        for t in 0..200 {
            let topic = format!("t{t}");
            let before = place(&topic, &all).unwrap();
            assert_ne!(before.sequencer, before.replica);
            let rest: Vec<String> = all
                .iter()
                .filter(|n| **n != before.sequencer)
                .cloned()
                .collect();
            let after = place(&topic, &rest).unwrap();
            assert_eq!(after.sequencer, before.replica, "topic {topic}");
        }
    }

    #[test]
    fn topics_spread_and_order_does_not_matter() {
        let all = nodes(&["a", "b", "c"]);
        let mut reversed = all.clone();
        reversed.reverse();
        let mut counts = std::collections::HashMap::new();
        for t in 0..3000 {
            let topic = format!("topic-{t}");
            let p = place(&topic, &all).unwrap();
            assert_eq!(p, place(&topic, &reversed).unwrap());
            *counts.entry(p.sequencer).or_insert(0) += 1;
        }
        for (node, count) in counts {
            assert!(
                (800..1200).contains(&count),
                "{node} sequences {count} of 3000"
            );
        }
    }

    #[test]
    fn partitions_spread_and_topics_of_a_partition_share_a_placement() {
        let mut sizes = vec![0usize; PARTITIONS];
        for t in 0..(PARTITIONS * 20) {
            sizes[partition(&format!("md.xnas.{t:07}.l1"))] += 1;
        }
        // 20 topics per partition on average: none empty, none more than three times that.
        assert!(sizes.iter().all(|n| (1..=60).contains(n)), "{sizes:?}");
        let all = nodes(&["a", "b", "c"]);
        let topic = "prices.eur";
        assert_eq!(place(topic, &all), place_partition(partition(topic), &all));
    }

    #[test]
    fn one_node_is_both_and_none_is_none() {
        let p = place("t", &nodes(&["a"])).unwrap();
        assert_eq!((p.sequencer.as_str(), p.replica.as_str()), ("a", "a"));
        assert!(place("t", &[]).is_none());
    }
}
