//! Fuzzing, on stable Rust, of the parsers an outsider reaches on a node besides the client
//! frames and list formats (fuzzed in `streamfarm-core`'s `tests/fuzz_parsers.rs`): relay frames
//! (`interest`, `interest_ack`, `msg`, the handshake, the broker's frames), gossip datagrams
//! (chitchat's decoder, behind the authentication tag or not) and the config. Property tests
//! feed random bytes and mutations of the seed corpus (`tests/corpus/`, `node.example.toml`):
//! a parser may refuse, never panic. Bounded: a few hundred cases per property.

use proptest::prelude::*;

use crate::broker::wire::PeerFrame;
use crate::config::NodeConfig;
use crate::relay::{Handshake, LinkDown, LinkUp};

fn corpus() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("tests/corpus exists")
        .map(|entry| std::fs::read(entry.expect("readable").path()).expect("readable seed"))
        .collect();
    seeds.push(include_bytes!("../node.example.toml").to_vec());
    // Gossip: a valid envelope, and one with compressed blocks.
    let mut envelope = Vec::new();
    chitchat::ChitchatEnvelope {
        version: chitchat::ProtocolVersion::V0,
        message: chitchat::ChitchatMessage::BadCluster,
    }
    .serialize(&mut envelope);
    seeds.push(envelope);
    let block = zstd::bulk::compress(&[0u8; 4096], 3).expect("compresses");
    let mut ack = vec![0x53, 0xb0, 0, 2, 1];
    ack.extend((block.len() as u16).to_le_bytes());
    ack.extend(&block);
    ack.push(0);
    seeds.push(ack);
    seeds
}

fn mutate(seed: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(kind, at, byte) in edits {
        let len = bytes.len().max(1);
        match kind % 4 {
            0 => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= 1 << (byte % 8);
                }
            }
            1 => bytes.insert(at % (bytes.len() + 1), byte),
            2 => {
                if !bytes.is_empty() {
                    bytes.remove(at % len);
                }
            }
            _ => bytes.truncate(at % len),
        }
    }
    bytes
}

fn feed(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let _ = serde_json::from_str::<LinkUp>(&text);
    let _ = serde_json::from_str::<LinkDown>(&text);
    let _ = serde_json::from_str::<Handshake>(&text);
    let _ = serde_json::from_str::<PeerFrame>(&text);
    if let Ok(config) = NodeConfig::from_toml(&text) {
        // Validation reads no file here unless the input names one: keep it to the corpus's.
        if config.farm_secret_file.is_none() {
            let _ = config.validate();
        }
    }
    let mut cursor = input;
    let _ = chitchat::ChitchatEnvelope::deserialize(&mut cursor);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn node_parsers_survive_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        feed(&input);
    }

    #[test]
    fn node_parsers_survive_mutated_seeds(
        pick in any::<usize>(),
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8),
    ) {
        let seeds = corpus();
        feed(&mutate(&seeds[pick % seeds.len()], &edits));
    }
}

#[test]
fn every_seed_parses_as_what_it_is() {
    let seeds = corpus();
    assert!(seeds.len() >= 10, "{} seeds", seeds.len());
    let mut parsed = 0;
    for seed in &seeds {
        let text = String::from_utf8_lossy(seed);
        let ok = serde_json::from_str::<LinkUp>(&text).is_ok()
            || serde_json::from_str::<LinkDown>(&text).is_ok()
            || NodeConfig::from_toml(&text).is_ok()
            || chitchat::ChitchatEnvelope::deserialize(&mut &seed[..]).is_ok();
        parsed += usize::from(ok);
        feed(seed);
    }
    assert!(
        parsed >= seeds.len() - 1,
        "seeds that parse: {parsed} of {}",
        seeds.len()
    );
}
