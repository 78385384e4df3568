//! The machine's transitions, one case per rule of the algorithm: inputs in, actions out.

use super::*;
use streamfarm_core::ServerEntry;

const A: &str = "ws://a/stream";
const B: &str = "ws://b/stream";
const C: &str = "ws://c/stream";

fn list(servers: &[(&str, Status, u64, &str)]) -> FarmList {
    FarmList::new(
        servers
            .iter()
            .map(|&(url, status, users, group)| ServerEntry::new(url, url, status, users, group))
            .collect(),
    )
}

fn only(url: &str) -> FarmList {
    list(&[(url, Status::Up, 0, "A")])
}

fn machine(retry: RetryMode) -> Machine {
    Machine::new(
        MachineConfig {
            retry,
            ..MachineConfig::default()
        },
        1,
    )
}

fn connect(server: &str, reuse: bool) -> Action {
    Action::Connect {
        server: server.to_string(),
        reuse_list_connection: reuse,
        retry: false,
    }
}

fn retry_of(server: &str) -> Action {
    Action::Connect {
        server: server.to_string(),
        reuse_list_connection: false,
        retry: true,
    }
}

fn fetch(avoid: &[&str]) -> Action {
    Action::FetchList(ListSource::ServiceAddress {
        avoid: avoid.iter().map(|s| s.to_string()).collect(),
    })
}

fn servers(urls: &[&str]) -> Action {
    Action::FetchList(ListSource::Servers(
        urls.iter().map(|s| s.to_string()).collect(),
    ))
}

fn fetched(list: FarmList, via: &str) -> Input {
    Input::ListFetched {
        list,
        via: via.to_string(),
        age: Duration::ZERO,
    }
}

fn connected(server: &str) -> Input {
    Input::Connected {
        server: server.to_string(),
        list: None,
    }
}

fn failed(server: &str) -> Input {
    Input::ConnectFailed {
        server: server.to_string(),
        error: "refused".to_string(),
        elsewhere: false,
    }
}

fn lost(server: &str, cause: LossCause) -> Input {
    Input::Lost {
        server: server.to_string(),
        cause,
    }
}

fn closed(code: u16) -> LossCause {
    LossCause::Closed {
        code,
        reason: String::new(),
    }
}

/// A machine connected to `server` (the only server of its first list) at `t0`.
fn connected_to(server: &str, retry: RetryMode, t0: Instant) -> Machine {
    let mut m = machine(retry);
    m.handle(Input::Start, t0);
    m.handle(fetched(only(server), server), t0);
    m.handle(connected(server), t0);
    assert_eq!(
        m.state(),
        &State::Connected {
            server: server.to_string()
        }
    );
    m
}

fn sleep_of(actions: &[Action]) -> (Duration, u64) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Sleep { delay, timer } => Some((*delay, *timer)),
            _ => None,
        })
        .expect("a Sleep action")
}

#[test]
fn start_fetches_the_list_from_the_service_address() {
    let mut m = machine(RetryMode::RetryOnce);
    assert_eq!(m.handle(Input::Start, Instant::now()), vec![fetch(&[])]);
    assert_eq!(
        m.state(),
        &State::FetchingList {
            from_service_address: true,
            fallback: true
        }
    );
}

#[test]
fn list_from_the_picked_server_keeps_that_connection() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    let actions = m.handle(fetched(only(A), A), t0);
    assert_eq!(actions, vec![connect(A, true)]);
    // The reused connection is not dropped when it succeeds.
    let actions = m.handle(connected(A), t0);
    assert_eq!(
        actions,
        vec![Action::Notify(Notice::Connected {
            server: A.to_string()
        })]
    );
}

#[test]
fn list_from_another_server_connects_to_the_pick_then_drops_the_first() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    let three = list(&[
        (A, Status::Up, 10, "A"),
        (B, Status::Down, 0, "A"),
        (C, Status::Up, 10, "B"),
    ]);
    // Only A is a candidate (B is down, C is in a less preferred group); the list came via C.
    let actions = m.handle(fetched(three, C), t0);
    assert_eq!(actions, vec![connect(A, false)]);
    let actions = m.handle(connected(A), t0);
    assert_eq!(
        actions,
        vec![
            Action::DropListConnection,
            Action::Notify(Notice::Connected {
                server: A.to_string()
            })
        ]
    );
    assert_eq!(m.last_list().unwrap().servers.len(), 3);
}

#[test]
fn the_list_server_does_not_count_this_client() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    m.handle(
        fetched(list(&[(A, Status::Up, 1, "A"), (B, Status::Up, 0, "A")]), A),
        t0,
    );
    // A's one user is this client's list connection: both servers are empty.
    assert_eq!(m.last_list().unwrap().servers[0].users, 0);
}

#[test]
fn no_server_available_drops_the_list_connection_and_backs_off() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    let actions = m.handle(fetched(list(&[(A, Status::Down, 0, "A")]), A), t0);
    assert_eq!(actions[0], Action::DropListConnection);
    assert!(
        matches!(&actions[1], Action::Notify(Notice::Retrying { reason, .. })
        if reason.contains("no server available"))
    );
    let (delay, timer) = sleep_of(&actions);
    assert!(delay < Backoff::default().ceiling(0));
    assert_eq!(m.state(), &State::Waiting { timer });
}

#[test]
fn unreachable_service_address_asks_the_servers_of_the_last_list() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(
        Input::ListUpdated(list(&[
            (A, Status::Up, 1, "A"),
            (B, Status::Draining, 1, "A"),
            (C, Status::Down, 0, "A"),
        ])),
        t0,
    );
    m.handle(lost(A, LossCause::HeartbeatTimeout), t0);
    let actions = m.handle(
        Input::ListFailed {
            error: "timed out".into(),
        },
        t0,
    );
    // A just failed: B, draining but still a list server, is asked; then C, listed down but
    // known (a list can be stale: the client is never stranded while any server is up).
    assert_eq!(
        actions,
        vec![Action::FetchList(ListSource::Servers(vec![
            B.to_string(),
            C.to_string()
        ]))]
    );
    assert_eq!(
        m.state(),
        &State::FetchingList {
            from_service_address: false,
            fallback: false
        }
    );
    // The list B gives is used like any other.
    let actions = m.handle(fetched(list(&[(C, Status::Up, 0, "A")]), B), t0);
    assert_eq!(actions, vec![connect(C, false)]);
}

/// A machine connected to A whose last list is A, B and C, all UP with these users.
fn connected_in_three(retry: RetryMode, seed: u64, users: [u64; 3], t0: Instant) -> Machine {
    let mut m = Machine::new(
        MachineConfig {
            retry,
            ..MachineConfig::default()
        },
        seed,
    );
    m.handle(Input::Start, t0);
    m.handle(fetched(only(A), A), t0);
    m.handle(connected(A), t0);
    m.handle(Input::ListUpdated(three_up(users)), t0);
    m
}

fn migrate_asked(server: &str, to: Option<&str>) -> Input {
    Input::MigrateAsked {
        server: server.to_string(),
        to: to.map(str::to_string),
        reason: "rebalance".to_string(),
    }
}

#[test]
fn a_migration_connects_to_the_named_server_then_switches() {
    let t0 = Instant::now();
    let mut m = connected_in_three(RetryMode::RetryOnce, 1, [10, 0, 0], t0);
    let actions = m.handle(migrate_asked(A, Some(B)), t0);
    assert_eq!(
        actions,
        vec![Action::Migrate {
            server: B.to_string()
        }]
    );
    assert!(matches!(m.state(), State::Migrating { from, to, .. } if from == A && to == B));
    // A report about another server is stale.
    assert!(
        m.handle(Input::Migrated { server: C.into() }, t0)
            .is_empty()
    );
    let later = t0 + Duration::from_millis(40);
    let actions = m.handle(Input::Migrated { server: B.into() }, later);
    assert_eq!(
        actions,
        vec![Action::Notify(Notice::Migrated {
            from: A.into(),
            to: B.into(),
            reason: "rebalance".into(),
            took: Duration::from_millis(40),
        })]
    );
    assert_eq!(m.state(), &State::Connected { server: B.into() });
}

#[test]
fn a_migration_without_a_target_follows_the_policy_without_the_old_server() {
    let t0 = Instant::now();
    for seed in 0..20 {
        let mut m = connected_in_three(RetryMode::RetryOnce, seed, [0, 5, 5], t0);
        let actions = m.handle(migrate_asked(A, None), t0);
        let [Action::Migrate { server }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_ne!(server, A, "never back to the server that asked");
    }
    // Only the asking server known: nowhere to go, the client stays.
    let mut m = connected_to(A, RetryMode::RetryOnce, t0);
    assert!(m.handle(migrate_asked(A, None), t0).is_empty());
    assert_eq!(m.state(), &State::Connected { server: A.into() });
}

#[test]
fn a_failed_migration_stays_and_excludes_the_target() {
    let t0 = Instant::now();
    let mut m = connected_in_three(RetryMode::RetryOnce, 1, [10, 0, 0], t0);
    m.handle(migrate_asked(A, Some(B)), t0);
    let actions = m.handle(failed(B), t0);
    assert_eq!(
        actions,
        vec![Action::Notify(Notice::MigrationFailed {
            server: A.into(),
            to: B.into(),
            error: "refused".into(),
        })]
    );
    assert_eq!(m.state(), &State::Connected { server: A.into() });
    assert_eq!(m.excluded(t0), vec![B.to_string()]);
    // Asked again toward the excluded server: the policy picks another.
    let actions = m.handle(migrate_asked(A, Some(B)), t0);
    assert_eq!(
        actions,
        vec![Action::Migrate {
            server: C.to_string()
        }]
    );
}

#[test]
fn losing_the_old_server_mid_migration_makes_the_migration_the_failover() {
    let t0 = Instant::now();
    let mut m = connected_in_three(RetryMode::RetryOnce, 1, [10, 0, 0], t0);
    m.handle(migrate_asked(A, Some(B)), t0);
    let cause = closed(close::RECONNECT_ELSEWHERE);
    let actions = m.handle(lost(A, cause.clone()), t0);
    assert_eq!(
        actions,
        vec![Action::Notify(Notice::Disconnected {
            server: A.into(),
            cause
        })]
    );
    assert_eq!(
        m.state(),
        &State::Connecting {
            server: B.into(),
            retry: false
        }
    );
    let later = t0 + Duration::from_millis(30);
    let actions = m.handle(connected(B), later);
    assert!(actions.contains(&Action::Notify(Notice::FailedOver {
        from: A.into(),
        to: B.into(),
        took: Duration::from_millis(30),
    })));
}

fn three_up(users: [u64; 3]) -> FarmList {
    list(&[
        (A, Status::Up, users[0], "A"),
        (B, Status::Up, users[1], "A"),
        (C, Status::Up, users[2], "A"),
    ])
}

/// The urls of the `Servers` fetch in `actions`.
fn asked(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .find_map(|a| match a {
            Action::FetchList(ListSource::Servers(urls)) => Some(urls.clone()),
            _ => None,
        })
        .expect("a FetchList from servers")
}

#[test]
fn failover_asks_the_pick_of_the_last_list_then_the_others_then_the_service_address() {
    let t0 = Instant::now();
    let mut m = connected_in_three(RetryMode::Immediate, 1, [100, 0, 0], t0);
    let actions = m.handle(lost(A, closed(1006)), t0);
    // A is excluded; B and C are both asked, the pick first; the service address is not.
    let mut urls = asked(&actions);
    assert_eq!(urls.len(), 2, "{urls:?}");
    urls.sort();
    assert_eq!(urls, vec![B.to_string(), C.to_string()]);
    assert_eq!(
        m.state(),
        &State::FetchingList {
            from_service_address: false,
            fallback: true
        }
    );
    // Neither answers: the service address is the fallback, A's addresses last.
    let actions = m.handle(Input::ListFailed { error: "x".into() }, t0);
    assert_eq!(actions, vec![fetch(&[A])]);
    assert_eq!(
        m.state(),
        &State::FetchingList {
            from_service_address: true,
            fallback: false
        }
    );
    // Nothing there either: the round is over.
    let actions = m.handle(Input::ListFailed { error: "y".into() }, t0);
    let (_, timer) = sleep_of(&actions);
    assert_eq!(m.state(), &State::Waiting { timer });
}

#[test]
fn retry_once_then_asks_the_pick_of_the_last_list() {
    let t0 = Instant::now();
    let mut m = connected_in_three(RetryMode::RetryOnce, 2, [100, 0, 0], t0);
    let actions = m.handle(lost(A, LossCause::Broken("reset".into())), t0);
    assert_eq!(actions[1], retry_of(A));
    let actions = m.handle(failed(A), t0);
    let urls = asked(&actions);
    assert!(!urls.contains(&A.to_string()), "{urls:?}");
    assert_eq!(m.excluded(t0), vec![A.to_string()]);
}

#[test]
fn the_pick_stands_while_its_fresh_list_still_has_it_as_a_candidate() {
    let t0 = Instant::now();
    for seed in 0..32 {
        let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 30, 10], t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        let pick = asked(&actions)[0].clone();
        // The pick's own list shows it far busier than the other (it counts its own new
        // users at once): it stays the pick, on the connection the list came over.
        let mut fresh = three_up([0, 0, 0]);
        fresh
            .servers
            .iter_mut()
            .find(|s| s.url == pick)
            .unwrap()
            .users = 900;
        let actions = m.handle(fetched(fresh, &pick), t0);
        assert_eq!(actions, vec![connect(&pick, true)], "seed {seed}");
        let actions = m.handle(connected(&pick), t0);
        assert!(!actions.contains(&Action::DropListConnection));
    }
}

#[test]
fn the_pick_on_the_last_list_follows_the_policy() {
    // B 300 users, C 100, A lost: the weighted policy gives B (1 - 300/400) / 1 = 0.25.
    let t0 = Instant::now();
    let runs = 4000;
    let mut to_b = 0;
    for seed in 0..runs {
        let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 300, 100], t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        to_b += usize::from(asked(&actions)[0] == B);
    }
    let share_b = to_b as f64 / runs as f64;
    assert!((share_b - 0.25).abs() < 0.03, "B got {share_b}");
}

#[test]
fn a_list_from_another_server_than_the_pick_is_selected_on_afresh() {
    let t0 = Instant::now();
    let mut chosen = std::collections::BTreeSet::new();
    for seed in 0..32 {
        let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 0, 0], t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        let urls = asked(&actions);
        // The pick did not answer; the next server did, and its list still shows the pick.
        let actions = m.handle(fetched(three_up([0, 0, 0]), &urls[1]), t0);
        let [
            Action::Connect {
                server,
                reuse_list_connection,
                ..
            },
        ] = &actions[..]
        else {
            panic!("seed {seed}: {actions:?}");
        };
        assert_ne!(server, A);
        assert_eq!(*reuse_list_connection, *server == urls[1], "seed {seed}");
        chosen.insert(server.clone());
    }
    // A fresh selection draws again: over the seeds both servers are chosen.
    assert_eq!(chosen.len(), 2);
}

#[test]
fn the_pick_follows_the_fresh_list_when_it_is_no_longer_a_candidate() {
    let t0 = Instant::now();
    for seed in 0..16 {
        let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 0, 0], t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        let pick = asked(&actions)[0].clone();
        let other = if pick == B { C } else { B };
        // The server asked says it is draining: the other one is picked, the list
        // connection is dropped once the other is connected.
        let mut fresh = three_up([0, 0, 0]);
        fresh
            .servers
            .iter_mut()
            .find(|s| s.url == pick)
            .unwrap()
            .status = Status::Draining;
        let actions = m.handle(fetched(fresh, &pick), t0);
        assert_eq!(actions, vec![connect(other, false)], "seed {seed}");
        let actions = m.handle(connected(other), t0);
        assert_eq!(actions[0], Action::DropListConnection);
    }
}

#[test]
fn the_pick_is_forgotten_when_it_gives_no_list() {
    let t0 = Instant::now();
    let mut moved = 0;
    for seed in 0..32 {
        let mut m = connected_in_three(RetryMode::Immediate, seed, [100, 0, 0], t0);
        let actions = m.handle(lost(A, closed(1006)), t0);
        let pick = asked(&actions)[0].clone();
        // Neither the pick nor the other answered; the service address then reached the
        // pick after all. Its list is selected on afresh, where the pick weighs 0.25.
        m.handle(Input::ListFailed { error: "x".into() }, t0);
        let mut fresh = three_up([0, 100, 100]);
        fresh
            .servers
            .iter_mut()
            .find(|s| s.url == pick)
            .unwrap()
            .users = 301;
        let actions = m.handle(fetched(fresh, &pick), t0);
        let [
            Action::Connect {
                server,
                reuse_list_connection,
                ..
            },
        ] = &actions[..]
        else {
            panic!("seed {seed}: {actions:?}");
        };
        assert_eq!(*reuse_list_connection, *server == pick, "seed {seed}");
        moved += usize::from(*server != pick);
    }
    assert!(moved > 0 && moved < 32, "{moved} of 32 moved");
}

#[test]
fn unreachable_service_address_without_a_list_backs_off() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    let actions = m.handle(
        Input::ListFailed {
            error: "refused".into(),
        },
        t0,
    );
    let (_, timer) = sleep_of(&actions);
    assert_eq!(m.state(), &State::Waiting { timer });
}

#[test]
fn no_list_from_the_other_servers_either_backs_off() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(
        Input::ListUpdated(list(&[(A, Status::Up, 1, "A"), (B, Status::Up, 1, "A")])),
        t0,
    );
    m.handle(lost(A, LossCause::Broken("reset".into())), t0);
    m.handle(Input::ListFailed { error: "x".into() }, t0);
    let actions = m.handle(Input::ListFailed { error: "y".into() }, t0);
    let (_, timer) = sleep_of(&actions);
    assert_eq!(m.state(), &State::Waiting { timer });
}

#[test]
fn timer_starts_the_next_round_and_stale_timers_are_ignored() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    let actions = m.handle(Input::ListFailed { error: "x".into() }, t0);
    let (_, timer) = sleep_of(&actions);
    assert_eq!(m.handle(Input::TimerFired { timer: timer + 1 }, t0), vec![]);
    assert_eq!(m.state(), &State::Waiting { timer });
    assert_eq!(m.handle(Input::TimerFired { timer }, t0), vec![fetch(&[])]);
}

#[test]
fn failed_connect_is_retried_once_then_excluded_and_the_next_round_backs_off() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    m.handle(fetched(only(B), C), t0);
    let actions = m.handle(failed(B), t0);
    assert_eq!(actions, vec![Action::DropListConnection, retry_of(B)]);
    assert_eq!(
        m.state(),
        &State::Connecting {
            server: B.to_string(),
            retry: true
        }
    );
    let actions = m.handle(failed(B), t0);
    assert!(matches!(
        &actions[..],
        [
            Action::Notify(Notice::Retrying { .. }),
            Action::Sleep { .. }
        ]
    ));
    assert_eq!(m.excluded(t0), vec![B.to_string()]);
}

#[test]
fn a_server_refusing_with_an_elsewhere_code_is_not_retried() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    m.handle(fetched(only(B), C), t0);
    let actions = m.handle(
        Input::ConnectFailed {
            server: B.to_string(),
            error: "closed (4003) full".into(),
            elsewhere: true,
        },
        t0,
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Connect { .. })));
    assert_eq!(m.excluded(t0), vec![B.to_string()]);
}

#[test]
fn retry_that_works_reports_a_failover_to_the_same_server() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::RetryOnce, t0);
    let actions = m.handle(lost(A, closed(1006)), t0);
    assert_eq!(
        actions,
        vec![
            Action::Notify(Notice::Disconnected {
                server: A.to_string(),
                cause: closed(1006)
            }),
            retry_of(A)
        ]
    );
    assert_eq!(
        m.state(),
        &State::Connecting {
            server: A.to_string(),
            retry: true
        }
    );
    let t1 = t0 + Duration::from_millis(40);
    let actions = m.handle(connected(A), t1);
    assert_eq!(
        actions[1],
        Action::Notify(Notice::FailedOver {
            from: A.to_string(),
            to: A.to_string(),
            took: Duration::from_millis(40)
        })
    );
}

#[test]
fn lost_connection_whose_retry_fails_re_requests_the_list_at_once() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::RetryOnce, t0);
    m.handle(lost(A, LossCause::HeartbeatTimeout), t0);
    let actions = m.handle(failed(A), t0);
    // The first round after a good connection does not wait.
    assert_eq!(actions, vec![fetch(&[A])]);
    assert_eq!(m.excluded(t0), vec![A.to_string()]);
    // A is excluded: the new list's other server is picked even though A looks emptier.
    let actions = m.handle(
        fetched(
            list(&[(A, Status::Up, 0, "A"), (B, Status::Up, 100, "A")]),
            B,
        ),
        t0,
    );
    assert_eq!(actions, vec![connect(B, true)]);
    let t1 = t0 + Duration::from_millis(250);
    let actions = m.handle(connected(B), t1);
    assert!(actions.contains(&Action::Notify(Notice::FailedOver {
        from: A.to_string(),
        to: B.to_string(),
        took: Duration::from_millis(250)
    })));
}

#[test]
fn immediate_mode_re_requests_at_once_without_retrying() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    let actions = m.handle(lost(A, closed(1006)), t0);
    assert_eq!(actions[1], fetch(&[A]));
    // A failed pick is not retried either.
    m.handle(fetched(list(&[(B, Status::Up, 0, "A")]), B), t0);
    let actions = m.handle(failed(B), t0);
    assert!(matches!(
        &actions[..],
        [
            Action::Notify(Notice::Retrying { .. }),
            Action::Sleep { .. }
        ]
    ));
}

#[test]
fn reconnect_elsewhere_and_going_away_are_not_retried() {
    for code in [close::RECONNECT_ELSEWHERE, close::GOING_AWAY] {
        let t0 = Instant::now();
        let mut m = connected_to(A, RetryMode::RetryOnce, t0);
        let actions = m.handle(lost(A, closed(code)), t0);
        assert_eq!(actions[1], fetch(&[A]), "code {code}");
        assert_eq!(m.excluded(t0), vec![A.to_string()]);
    }
}

#[test]
fn cool_down_ends() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(lost(A, closed(close::GOING_AWAY)), t0);
    let later = t0 + MachineConfig::default().cool_down;
    assert!(m.excluded(later).is_empty());
    // Within the cool-down, the list is asked of the service address (A last), and no one
    // else is known: the round ends.
    let actions = m.handle(
        Input::ListFailed {
            error: "refused".into(),
        },
        t0,
    );
    let (_, timer) = sleep_of(&actions);
    // The last list names A, no longer excluded: A itself is asked for a list.
    assert_eq!(
        m.handle(Input::TimerFired { timer }, later),
        vec![servers(&[A])]
    );
    assert_eq!(m.handle(fetched(only(A), A), later), vec![connect(A, true)]);
}

#[test]
fn a_server_in_its_cool_down_is_chosen_when_the_list_has_no_other() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(lost(A, closed(1006)), t0);
    // A lone server that restarts answers the service address: it is taken at once, not
    // after the cool-down.
    assert_eq!(m.handle(fetched(only(A), A), t0), vec![connect(A, true)]);
    // With another candidate on the list, the excluded server is left out.
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(lost(A, closed(1006)), t0);
    let two = list(&[(A, Status::Up, 0, "A"), (B, Status::Up, 50, "A")]);
    assert_eq!(m.handle(fetched(two, A), t0), vec![connect(B, false)]);
    // A candidate of a less preferred group is taken before an excluded one of the best.
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(lost(A, closed(1006)), t0);
    let groups = list(&[(A, Status::Up, 0, "A"), (B, Status::Up, 50, "B")]);
    assert_eq!(m.handle(fetched(groups, A), t0), vec![connect(B, false)]);
    // Servers that are not up stay out even then.
    let mut m = connected_to(A, RetryMode::Immediate, t0);
    m.handle(lost(A, closed(1006)), t0);
    let down = list(&[(A, Status::Up, 0, "A"), (B, Status::Down, 0, "A")]);
    assert_eq!(m.handle(fetched(down, B), t0)[0], connect(A, false));
}

#[test]
fn backoff_grows_with_failed_rounds_and_resets_on_connect() {
    let t0 = Instant::now();
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
    let mut m = Machine::new(
        MachineConfig {
            backoff,
            ..MachineConfig::default()
        },
        3,
    );
    m.handle(Input::Start, t0);
    for round in 0..6 {
        let actions = m.handle(Input::ListFailed { error: "x".into() }, t0);
        let (delay, timer) = sleep_of(&actions);
        assert!(delay < backoff.ceiling(round), "round {round}: {delay:?}");
        m.handle(Input::TimerFired { timer }, t0);
    }
    m.handle(fetched(only(A), A), t0);
    m.handle(connected(A), t0);
    m.handle(lost(A, closed(close::GOING_AWAY)), t0);
    // Back to the first round after the good connection: the re-request is immediate.
    assert_eq!(
        m.state(),
        &State::FetchingList {
            from_service_address: true,
            fallback: true
        }
    );
}

#[test]
fn stop_closes_from_any_state_and_then_ignores_everything() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::RetryOnce, t0);
    assert_eq!(m.handle(Input::Stop, t0), vec![Action::Close]);
    assert_eq!(m.state(), &State::Stopped);
    assert_eq!(m.handle(Input::Start, t0), vec![]);
    assert_eq!(m.handle(lost(A, closed(1006)), t0), vec![]);

    // Stopping while a list connection is held drops it too.
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    m.handle(fetched(list(&[(B, Status::Up, 0, "A")]), A), t0);
    assert_eq!(
        m.handle(Input::Stop, t0),
        vec![Action::DropListConnection, Action::Close]
    );
}

#[test]
fn list_updates_are_kept_in_any_state() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::RetryOnce, t0);
    let newer = list(&[(A, Status::Up, 5, "A"), (B, Status::Up, 3, "A")]);
    assert_eq!(m.handle(Input::ListUpdated(newer.clone()), t0), vec![]);
    assert_eq!(m.last_list(), Some(&newer));
    assert!(matches!(m.state(), State::Connected { .. }));
}

#[test]
fn connected_carries_a_fresher_list() {
    let t0 = Instant::now();
    let mut m = machine(RetryMode::RetryOnce);
    m.handle(Input::Start, t0);
    m.handle(fetched(only(A), A), t0);
    let fresh = list(&[(A, Status::Up, 1, "A"), (B, Status::Up, 0, "A")]);
    m.handle(
        Input::Connected {
            server: A.to_string(),
            list: Some(fresh.clone()),
        },
        t0,
    );
    assert_eq!(m.last_list(), Some(&fresh));
}

#[test]
fn reports_about_other_servers_or_states_are_ignored() {
    let t0 = Instant::now();
    let mut m = connected_to(A, RetryMode::RetryOnce, t0);
    for input in [
        lost(B, closed(1006)),
        connected(B),
        failed(A),
        Input::ListFailed { error: "x".into() },
        fetched(only(B), B),
        Input::TimerFired { timer: 0 },
        Input::Start,
    ] {
        assert_eq!(m.handle(input.clone(), t0), vec![], "{input:?}");
        assert!(matches!(m.state(), State::Connected { .. }), "{input:?}");
    }
    let mut idle = machine(RetryMode::RetryOnce);
    assert_eq!(idle.handle(connected(A), t0), vec![]);
    assert_eq!(idle.state(), &State::Idle);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Inputs about servers A, B and C in any order, including nonsense for the state.
    fn input() -> impl Strategy<Value = Input> {
        let server = prop_oneof![Just(A), Just(B), Just(C)];
        let status = prop_oneof![Just(Status::Up), Just(Status::Down), Just(Status::Draining)];
        prop_oneof![
            Just(Input::Start),
            (server.clone(), status, server.clone()).prop_map(|(s, st, via)| fetched(
                list(&[(s, st, 1, "A"), (B, Status::Up, 2, "B")]),
                via
            )),
            Just(Input::ListFailed { error: "x".into() }),
            server.clone().prop_map(connected),
            (server.clone(), any::<bool>()).prop_map(|(s, elsewhere)| Input::ConnectFailed {
                server: s.to_string(),
                error: "x".into(),
                elsewhere
            }),
            (
                server,
                prop_oneof![Just(1006u16), Just(4000), Just(1001), Just(4002)]
            )
                .prop_map(|(s, code)| lost(s, closed(code))),
            (0u64..4).prop_map(|timer| Input::TimerFired { timer }),
            Just(Input::Stop),
        ]
    }

    proptest! {
        /// Whatever happens, the driver is never asked to run two things at once, never to
        /// drop a list connection it does not hold, and nothing follows a stop.
        #[test]
        fn the_machine_asks_for_one_thing_at_a_time(
            inputs in proptest::collection::vec((input(), 0u64..3000), 1..60),
            immediate in any::<bool>(),
        ) {
            let mut m = machine(if immediate { RetryMode::Immediate } else { RetryMode::RetryOnce });
            let t0 = Instant::now();
            let mut now = t0;
            let mut holding = false;
            for (input, step_ms) in inputs {
                now += Duration::from_millis(step_ms);
                let was_stopped = *m.state() == State::Stopped;
                if matches!(input, Input::ListFetched { .. })
                    && matches!(m.state(), State::FetchingList { .. })
                {
                    holding = true;
                }
                let actions = m.handle(input, now);
                if was_stopped {
                    prop_assert!(actions.is_empty());
                }
                let started = actions
                    .iter()
                    .filter(|a| matches!(a, Action::FetchList(_) | Action::Connect { .. } | Action::Sleep { .. }))
                    .count();
                prop_assert!(started <= 1, "{actions:?}");
                for action in &actions {
                    match action {
                        Action::DropListConnection => {
                            prop_assert!(holding, "dropped a list connection not held");
                            holding = false;
                        }
                        Action::Connect { reuse_list_connection: true, .. } => {
                            prop_assert!(holding, "reused a list connection not held");
                            holding = false;
                        }
                        _ => {}
                    }
                }
                // Each waiting or working state was entered with the action that ends it.
                let entered_with_its_action = match m.state() {
                    State::Waiting { timer } => actions
                        .iter()
                        .any(|a| matches!(a, Action::Sleep { timer: t, .. } if t == timer)),
                    State::FetchingList { .. } => {
                        actions.iter().any(|a| matches!(a, Action::FetchList(_)))
                    }
                    State::Connecting { server, .. } => actions
                        .iter()
                        .any(|a| matches!(a, Action::Connect { server: s, .. } if s == server)),
                    _ => true,
                };
                prop_assert!(started == 0 || entered_with_its_action, "{actions:?}");
            }
        }
    }
}

#[test]
fn loss_causes_say_whether_to_go_elsewhere() {
    assert!(closed(close::RECONNECT_ELSEWHERE).sends_elsewhere());
    assert!(closed(close::GOING_AWAY).sends_elsewhere());
    assert!(closed(close::SERVER_FULL).sends_elsewhere());
    assert!(closed(close::POLICY_VIOLATION).sends_elsewhere());
    assert!(!closed(close::HEARTBEAT_TIMEOUT).sends_elsewhere());
    assert!(!closed(close::SLOW_CONSUMER).sends_elsewhere());
    assert!(!LossCause::HeartbeatTimeout.sends_elsewhere());
    assert_eq!(closed(4000).to_string(), "closed (4000)");
}
