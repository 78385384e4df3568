//! The failover machine's shared transition vectors (`tests/data/machine_transitions.json`, and
//! its migrations in `tests/data/migration_vectors.json`): the browser client's port of the
//! machine (`clients/browser/src/machine.ts`) runs the same files, so a change to either machine
//! that the other does not make fails a test.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use streamfarm_client::machine::{
    Action, Input, ListSource, LossCause, Machine, MachineConfig, Notice, RetryMode,
};
use streamfarm_core::FarmList;

fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("the vector file is readable");
    serde_json::from_str(&text).expect("the vector file is JSON")
}

fn text(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .to_string()
}

fn list(v: &Value) -> FarmList {
    serde_json::from_value(v.clone()).expect("a farm list")
}

fn cause(v: &Value) -> LossCause {
    match v["kind"].as_str() {
        Some("closed") => LossCause::Closed {
            code: v["code"].as_u64().expect("code") as u16,
            reason: v["reason"].as_str().unwrap_or("").to_string(),
        },
        Some("heartbeat_timeout") => LossCause::HeartbeatTimeout,
        Some("broken") => LossCause::Broken(v["detail"].as_str().unwrap_or("").to_string()),
        other => panic!("unknown loss cause {other:?}"),
    }
}

fn cause_json(cause: &LossCause) -> Value {
    match cause {
        LossCause::Closed { code, reason } => {
            json!({"kind": "closed", "code": code, "reason": reason})
        }
        LossCause::HeartbeatTimeout => json!({"kind": "heartbeat_timeout"}),
        LossCause::Broken(detail) => json!({"kind": "broken", "detail": detail}),
    }
}

fn input(v: &Value) -> Input {
    match v["type"].as_str().expect("an input type") {
        "start" => Input::Start,
        "stop" => Input::Stop,
        "list_fetched" => Input::ListFetched {
            list: list(&v["list"]),
            via: text(v, "via"),
            age: Duration::from_millis(v["age_ms"].as_u64().unwrap_or(0)),
        },
        "list_failed" => Input::ListFailed {
            error: text(v, "error"),
        },
        "list_updated" => Input::ListUpdated(list(&v["list"])),
        "connected" => Input::Connected {
            server: text(v, "server"),
            list: v.get("list").map(list),
        },
        "connect_failed" => Input::ConnectFailed {
            server: text(v, "server"),
            error: text(v, "error"),
            elsewhere: v["elsewhere"].as_bool().expect("elsewhere"),
        },
        "lost" => Input::Lost {
            server: text(v, "server"),
            cause: cause(&v["cause"]),
        },
        "migrate_asked" => Input::MigrateAsked {
            server: text(v, "server"),
            to: v["to"].as_str().map(str::to_string),
            reason: text(v, "reason"),
        },
        "migrated" => Input::Migrated {
            server: text(v, "server"),
        },
        "timer_fired" => Input::TimerFired {
            timer: v["timer"].as_u64().expect("timer"),
        },
        other => panic!("unknown input {other}"),
    }
}

/// An action in the vectors' shape; random delays are checked against `delay_below_ms` of the
/// expected action, and a retrying notice's reason is not compared.
fn action_json(action: &Action, expected: &Value) -> Value {
    let below = |delay: &Duration| {
        let limit = expected["delay_below_ms"]
            .as_u64()
            .or_else(|| expected["notice"]["delay_below_ms"].as_u64());
        match limit {
            Some(limit) if delay.as_millis() < u128::from(limit) => json!(limit),
            _ => json!(format!("{delay:?}")),
        }
    };
    match action {
        Action::FetchList(ListSource::ServiceAddress { avoid }) => {
            json!({"type": "fetch_list", "source": {"kind": "service_address", "avoid": avoid}})
        }
        Action::FetchList(ListSource::Servers(urls)) => {
            json!({"type": "fetch_list", "source": {"kind": "servers", "urls": urls}})
        }
        Action::Connect {
            server,
            reuse_list_connection,
            retry,
        } => json!({"type": "connect", "server": server,
            "reuse_list_connection": reuse_list_connection, "retry": retry}),
        Action::Migrate { server } => json!({"type": "migrate", "server": server}),
        Action::DropListConnection => json!({"type": "drop_list_connection"}),
        Action::Sleep { delay, timer } => {
            json!({"type": "sleep", "timer": timer, "delay_below_ms": below(delay)})
        }
        Action::Close => json!({"type": "close"}),
        Action::Notify(notice) => {
            let notice = match notice {
                Notice::Connected { server } => json!({"type": "connected", "server": server}),
                Notice::Disconnected { server, cause } => {
                    json!({"type": "disconnected", "server": server, "cause": cause_json(cause)})
                }
                Notice::FailedOver { from, to, took } => json!({"type": "failed_over",
                    "from": from, "to": to, "took_ms": took.as_millis() as u64}),
                Notice::Migrated {
                    from,
                    to,
                    reason,
                    took,
                } => json!({"type": "migrated", "from": from, "to": to, "reason": reason,
                    "took_ms": took.as_millis() as u64}),
                Notice::MigrationFailed { server, to, .. } => {
                    json!({"type": "migration_failed", "server": server, "to": to})
                }
                Notice::Retrying { delay, .. } => {
                    json!({"type": "retrying", "delay_below_ms": below(delay)})
                }
            };
            json!({"type": "notify", "notice": notice})
        }
    }
}

fn state_json(machine: &Machine) -> Value {
    use streamfarm_client::machine::State;
    match machine.state() {
        State::Idle => json!({"type": "idle"}),
        State::FetchingList {
            from_service_address,
            fallback,
        } => json!({"type": "fetching_list",
            "from_service_address": from_service_address, "fallback": fallback}),
        State::Connecting { server, retry } => {
            json!({"type": "connecting", "server": server, "retry": retry})
        }
        State::Connected { server } => json!({"type": "connected", "server": server}),
        State::Migrating { from, to, .. } => {
            json!({"type": "migrating", "from": from, "to": to})
        }
        State::Waiting { timer } => json!({"type": "waiting", "timer": timer}),
        State::Stopped => json!({"type": "stopped"}),
    }
}

fn run(vector: &Value) -> Result<(), String> {
    let retry = match vector["retry"].as_str() {
        Some("immediate") => RetryMode::Immediate,
        _ => RetryMode::RetryOnce,
    };
    let mut machine = Machine::new(
        MachineConfig {
            retry,
            ..MachineConfig::default()
        },
        1,
    );
    let t0 = Instant::now();
    for (i, step) in vector["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .enumerate()
    {
        let now = t0 + Duration::from_millis(step["at_ms"].as_u64().unwrap_or(0));
        let actions = machine.handle(input(&step["input"]), now);
        let expected = step["expect"].as_array().expect("expect");
        let got: Vec<Value> = actions
            .iter()
            .enumerate()
            .map(|(k, a)| action_json(a, expected.get(k).unwrap_or(&Value::Null)))
            .collect();
        if got != *expected {
            return Err(format!(
                "step {i} ({}): actions {got:?}, expected {expected:?}",
                step["input"]["type"]
            ));
        }
        if let Some(state) = step.get("state")
            && state_json(&machine) != *state
        {
            return Err(format!(
                "step {i}: state {}, expected {state}",
                state_json(&machine)
            ));
        }
        if let Some(excluded) = step.get("excluded") {
            let got = json!(machine.excluded(now));
            if got != *excluded {
                return Err(format!("step {i}: excluded {got}, expected {excluded}"));
            }
        }
    }
    if let Some(users) = vector.get("last_list_users").and_then(Value::as_object) {
        let last = machine.last_list().ok_or("no last list")?;
        for (url, want) in users {
            let have = last.by_url(url).map(|s| s.users);
            if have != want.as_u64() {
                return Err(format!(
                    "last list: {url} has {have:?} users, expected {want}"
                ));
            }
        }
    }
    Ok(())
}

fn run_file(name: &str) {
    let file = load(name);
    let vectors = file["vectors"].as_array().expect("vectors");
    assert!(!vectors.is_empty());
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|v| run(v).err().map(|why| format!("{}: {why}", v["name"])))
        .collect();
    assert!(
        failures.is_empty(),
        "failing vectors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_machine_vector_passes() {
    run_file("machine_transitions.json");
}

#[test]
fn every_migration_vector_passes() {
    run_file("migration_vectors.json");
}
