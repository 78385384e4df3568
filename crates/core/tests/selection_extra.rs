//! The selection cases for a list's `draw` and `in_flight` (`tests/data/selection_extra.json`),
//! which the browser client runs too (`clients/browser/test/unit/selection_extra.test.mjs`): both
//! clients must give the same probabilities and the same pick.
//!
//! Each case names the number the client's own random draw returns (`own_draw`), so that the pick
//! is exact whether the list's `draw` or the client's own decides it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::{Rng, RngCore};
use serde::Deserialize;
use streamfarm_core::FarmList;
use streamfarm_core::selection::{self, Policy};

/// The file. Unknown fields fail the test: a case that asks for something this test does not check
/// must not pass by being half-read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[allow(dead_code)]
    about: String,
    tolerance: f64,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
    policy: String,
    list: FarmList,
    #[serde(default)]
    exclude: Vec<String>,
    own_draw: f64,
    expect: Expect,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Expect {
    /// The probability of every server by url, and the url picked.
    Choice {
        probabilities: BTreeMap<String, f64>,
        pick: String,
    },
    /// The error code ([`selection::SelectionError::code`]).
    Error(String),
}

/// An RNG whose every `f64` draw is the same number in `[0, 1)`: `rand` makes an `f64` from the
/// top 53 bits of a `u64`, so a number with 53 bits of fraction or fewer comes back exactly.
struct OwnDraw(u64);

impl OwnDraw {
    const SCALE: f64 = (1u64 << 53) as f64;

    fn new(draw: f64) -> Self {
        let fraction = (draw * Self::SCALE) as u64;
        assert!(
            (0.0..1.0).contains(&draw) && fraction as f64 / Self::SCALE == draw,
            "own_draw {draw} is not a 53-bit fraction in [0, 1)"
        );
        OwnDraw(fraction << 11)
    }
}

impl RngCore for OwnDraw {
    fn next_u32(&mut self) -> u32 {
        (self.0 >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for (byte, source) in dst.iter_mut().zip(self.0.to_be_bytes().iter().cycle()) {
            *byte = *source;
        }
    }
}

fn load() -> CaseFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/selection_extra.json");
    let text = std::fs::read_to_string(&path).expect("tests/data/selection_extra.json is readable");
    serde_json::from_str(&text).expect("tests/data/selection_extra.json has the case file's shape")
}

/// What `streamfarm_core` makes of a case, or of its policy, exclusions and own draw on `list`.
fn run(case: &Case, list: &FarmList) -> Result<Expect, String> {
    let policy: Policy = case.policy.parse().map_err(|e| format!("{e}"))?;
    let mut rng = OwnDraw::new(case.own_draw);
    match selection::choose(policy, list, &case.exclude, &mut rng) {
        Ok(choice) => Ok(Expect::Choice {
            probabilities: list
                .servers
                .iter()
                .zip(&choice.probabilities)
                .map(|(s, &p)| (s.url.clone(), p))
                .collect(),
            pick: list.servers[choice.index].url.clone(),
        }),
        Err(e) => Ok(Expect::Error(e.code().to_string())),
    }
}

/// Whether `got` is `want`, probabilities within `tolerance`.
fn agrees(got: &Expect, want: &Expect, tolerance: f64) -> bool {
    match (got, want) {
        (
            Expect::Choice {
                probabilities: got_p,
                pick: got_pick,
            },
            Expect::Choice {
                probabilities: want_p,
                pick: want_pick,
            },
        ) => {
            got_pick == want_pick
                && got_p.len() == want_p.len()
                && got_p
                    .iter()
                    .all(|(url, p)| want_p.get(url).is_some_and(|w| (p - w).abs() <= tolerance))
        }
        _ => got == want,
    }
}

#[test]
fn the_own_draw_rng_returns_its_number() {
    for draw in [0.0, 0.25, 0.5, 0.9] {
        assert_eq!(OwnDraw::new(draw).random::<f64>(), draw);
    }
}

#[test]
fn every_draw_and_in_flight_case_passes() {
    let file = load();
    let failures: Vec<String> = file
        .cases
        .iter()
        .filter_map(|case| match run(case, &case.list) {
            Ok(got) if agrees(&got, &case.expect, file.tolerance) => None,
            Ok(got) => Some(format!(
                "{}: got {got:?}, expected {:?}",
                case.name, case.expect
            )),
            Err(why) => Some(format!("{}: {why}", case.name)),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_cases_cover_draws_in_and_out_of_range_and_clients_in_flight() {
    let file = load();
    let lists = || file.cases.iter().map(|c| &c.list);
    assert!(lists().any(|l| l.draw.is_some_and(|d| (0.0..1.0).contains(&d))));
    assert!(lists().any(|l| l.draw.is_some_and(|d| !(0.0..1.0).contains(&d))));
    assert!(lists().any(|l| l.in_flight.is_some_and(|n| n > 1)));
    // A case whose pick the list's draw decides must name an own draw that picks elsewhere, or it
    // would pass on a client that ignores the list's draw.
    for case in file.cases.iter().filter(|c| c.list.draw.is_some()) {
        let without_draw = FarmList {
            draw: None,
            ..case.list.clone()
        };
        let in_range = case.list.draw.is_some_and(|d| (0.0..1.0).contains(&d));
        if let (Ok(Expect::Choice { pick: with, .. }), Ok(Expect::Choice { pick: without, .. })) =
            (run(case, &case.list), run(case, &without_draw))
        {
            assert_eq!(
                with != without,
                in_range,
                "{}: picks {with} with the list's draw, {without} without",
                case.name
            );
        }
    }
}
