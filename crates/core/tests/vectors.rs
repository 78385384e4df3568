//! The selection vectors (`tests/data/selection.json`): every vector must pass. The browser
//! client runs the same file (`clients/browser/test/unit/selection.test.mjs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Deserialize;
use streamfarm_core::encoding::{self, Format};
use streamfarm_core::selection::{self, Policy};
use streamfarm_core::{FarmList, ServerEntry};

/// The file. Unknown fields fail the test: a vector that asks for something this test does not
/// check (a list age, say) must not pass by being half-read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorFile {
    #[allow(dead_code)]
    about: String,
    tolerance: f64,
    vectors: Vec<Vector>,
    text_format: TextFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
    policy: String,
    servers: Vec<ServerEntry>,
    #[serde(default)]
    exclude: Vec<String>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Expect {
    /// The probability of every server of the list, by url.
    Probabilities(BTreeMap<String, f64>),
    /// The error code ([`selection::SelectionError::code`]).
    Error(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextFormat {
    #[allow(dead_code)]
    about: String,
    text: String,
    entries: Vec<ServerEntry>,
}

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/selection.json")
}

fn load() -> VectorFile {
    let text =
        std::fs::read_to_string(vectors_path()).expect("tests/data/selection.json is readable");
    serde_json::from_str(&text).expect("tests/data/selection.json has the vector file's shape")
}

/// Checks one vector; the error says which and why.
fn check(vector: &Vector, tolerance: f64) -> Result<(), String> {
    let policy: Policy = vector.policy.parse().map_err(|e| {
        format!(
            "policy {:?} is not one this crate knows ({e}): implement it or drop the vector",
            vector.policy
        )
    })?;
    let list = FarmList::new(vector.servers.clone());
    let result = selection::probabilities(policy, &list, &vector.exclude);
    match (&vector.expect, result) {
        (Expect::Error(code), Err(err)) if err.code() == code => {
            // Sampling must fail the same way.
            let mut rng = StdRng::seed_from_u64(1);
            match selection::choose(policy, &list, &vector.exclude, &mut rng) {
                Err(e) if e.code() == code => Ok(()),
                other => Err(format!(
                    "probabilities failed with {code} but choose gave {other:?}"
                )),
            }
        }
        (Expect::Error(code), Err(err)) => {
            Err(format!("expected error {code}, got {} ({err})", err.code()))
        }
        (Expect::Error(code), Ok(p)) => {
            Err(format!("expected error {code}, got probabilities {p:?}"))
        }
        (Expect::Probabilities(_), Err(err)) => Err(format!(
            "expected probabilities, got error {} ({err})",
            err.code()
        )),
        (Expect::Probabilities(expected), Ok(got)) => {
            for url in expected.keys() {
                if list.by_url(url).is_none() {
                    return Err(format!("expectation for {url}, which is not in the list"));
                }
            }
            for (server, p) in list.servers.iter().zip(&got) {
                let Some(want) = expected.get(&server.url) else {
                    return Err(format!(
                        "the vector gives no probability for {}",
                        server.url
                    ));
                };
                if (p - want).abs() > tolerance {
                    return Err(format!("{}: probability {p}, expected {want}", server.url));
                }
                if vector.exclude.contains(&server.url) && *p != 0.0 {
                    return Err(format!(
                        "{} is excluded but has probability {p}",
                        server.url
                    ));
                }
            }
            // A pick lands only where the probability is positive, whatever the seed.
            for seed in 0..64 {
                let mut rng = StdRng::seed_from_u64(seed);
                let choice = selection::choose(policy, &list, &vector.exclude, &mut rng)
                    .map_err(|e| format!("choose failed: {e}"))?;
                if got[choice.index] <= 0.0 {
                    return Err(format!(
                        "seed {seed} picked {}, whose probability is 0",
                        list.servers[choice.index].url
                    ));
                }
            }
            Ok(())
        }
    }
}

#[test]
fn every_selection_vector_passes() {
    let file = load();
    assert!(!file.vectors.is_empty(), "no vectors in the file");
    let failures: Vec<String> = file
        .vectors
        .iter()
        .filter_map(|v| {
            check(v, file.tolerance)
                .err()
                .map(|why| format!("{}: {why}", v.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failing vectors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn text_format_vector_parses_to_its_entries() {
    let file = load();
    let list = encoding::parse(&file.text_format.text, Format::Text).expect("the text parses");
    assert_eq!(list.servers, file.text_format.entries);
    assert_eq!(encoding::detect(&file.text_format.text), Format::Text);
    // And our renderer writes the description's lines back.
    assert_eq!(encoding::render(&list, Format::Text), file.text_format.text);
}

#[test]
fn a_vector_with_an_unknown_policy_fails_loudly() {
    let vector = Vector {
        name: "future".into(),
        note: None,
        policy: "telepathy".into(),
        servers: Vec::new(),
        exclude: Vec::new(),
        expect: Expect::Error("no_server_available".into()),
    };
    let why = check(&vector, 1e-9).unwrap_err();
    assert!(why.contains("telepathy"), "{why}");
}
