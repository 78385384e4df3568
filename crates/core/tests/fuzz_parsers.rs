//! Fuzzing, on stable Rust, of the parsers an outsider reaches in this crate: the farm list in
//! every format (a client parses what any list server sends) and the client and server frames
//! (a node parses what any client sends). Property tests feed each parser random bytes and
//! mutations of a seed corpus (`tests/corpus/`, plus every seed list rendered in every format):
//! a parser may refuse, never panic, and what it accepts renders and parses again.
//!
//! Bounded: a few hundred cases per property (`PROPTEST_CASES` raises it for a longer run).

use proptest::prelude::*;
use streamfarm_core::encoding::{self, Format};
use streamfarm_core::protocol::{ClientFrame, ServerFrame};

const FORMATS: [Format; 4] = [Format::Json, Format::Text, Format::Xml, Format::Js];

/// The committed seeds, and the JSON seed lists rendered in every format.
fn corpus() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("tests/corpus exists")
        .map(|entry| std::fs::read(entry.expect("readable").path()).expect("readable seed"))
        .collect();
    let lists: Vec<_> = seeds
        .iter()
        .filter_map(|s| encoding::parse(std::str::from_utf8(s).ok()?, Format::Json).ok())
        .collect();
    for list in lists {
        for format in FORMATS {
            seeds.push(encoding::render(&list, format).into_bytes());
        }
    }
    assert!(seeds.len() >= 8, "a corpus of {} seeds", seeds.len());
    seeds
}

/// One edit of a mutation: where (a fraction of the length), what.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let interesting = prop_oneof![
        any::<u8>(),
        Just(b'"'),
        Just(b'{'),
        Just(b'<'),
        Just(b'%'),
        Just(b'='),
        Just(b'\n'),
        Just(b'\\'),
        Just(0xff),
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Edit::Flip(at, 1 << (bit % 8))),
        (any::<usize>(), interesting).prop_map(|(at, byte)| Edit::Insert(at, byte)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(at, len)| Edit::Duplicate(at, len)),
    ]
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for edit in edits {
        let len = bytes.len().max(1);
        match *edit {
            Edit::Flip(at, mask) => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= mask;
                }
            }
            Edit::Insert(at, byte) => bytes.insert(at % (bytes.len() + 1), byte),
            Edit::Delete(at) => {
                if !bytes.is_empty() {
                    bytes.remove(at % len);
                }
            }
            Edit::Truncate(at) => bytes.truncate(at % len),
            Edit::Duplicate(at, n) => {
                let start = at % len;
                let end = (start + n % 64).min(bytes.len());
                let piece = bytes[start.min(bytes.len())..end].to_vec();
                bytes.splice(end..end, piece);
            }
        }
    }
    bytes
}

/// Feeds `input` to every parser of this crate: none may panic; what a list parser accepts
/// renders and parses again.
fn feed(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    for format in FORMATS {
        if let Ok(list) = encoding::parse(&text, format) {
            let again = encoding::render(&list, format);
            encoding::parse(&again, format).unwrap_or_else(|err| {
                panic!(
                    "{format:?}: a list it accepted does not parse once rendered: {err}\n{again}"
                )
            });
        }
    }
    let _ = encoding::parse_detected(&text);
    let _ = serde_json::from_str::<ClientFrame>(&text);
    let _ = serde_json::from_slice::<ClientFrame>(input);
    let _ = serde_json::from_str::<ServerFrame>(&text);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parsers_survive_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        feed(&input);
    }

    #[test]
    fn parsers_survive_mutated_seeds(
        pick in any::<usize>(),
        edits in proptest::collection::vec(edit(), 1..8),
    ) {
        let seeds = corpus();
        let input = mutate(&seeds[pick % seeds.len()], &edits);
        feed(&input);
    }
}

#[test]
fn every_seed_parses_as_what_it_is() {
    for seed in corpus() {
        feed(&seed);
    }
}
