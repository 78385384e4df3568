//! `streamfarm sub SERVICE TOPIC...`: subscribe and print every message and connection event,
//! one per line — readable text, or one JSON object per line with `--json`.
//!
//! It retries what a retry may fix (an unreachable, draining or full farm) for as long as it
//! runs, and stops with an error on a rejection that retrying meets again
//! ([`Event::Rejected`]): a refused certificate, or a refused token or subscription — unless the
//! token comes from `--token-file`, which may be renewed meanwhile.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use streamfarm_client::{Client, Event, Rejection, ServiceAddress, Transports};

use super::list::ClientArgs;
use super::load::stop_after;

/// Arguments of `streamfarm sub`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service: a URL, `host:port` (all its addresses), or a comma-separated seed list.
    service: ServiceAddress,
    /// Topics to subscribe to.
    #[arg(required = true)]
    topics: Vec<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Exit after this long (e.g. `30s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// `auto`: a WebSocket, or an event stream (`GET /sse`) where the upgrade is refused; `ws`
    /// or `sse`: that one only.
    #[arg(long, default_value = "auto", value_name = "auto|ws|sse")]
    transport: Transports,
    #[command(flatten)]
    client: ClientArgs,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let options = args
        .client
        .options()?
        .transports(args.transport)
        .subscribe(args.topics.iter().cloned());
    let mut client = Client::start(args.service.clone(), options);
    let stop = stop_after(args.duration);
    tokio::pin!(stop);
    let mut messages = 0u64;
    loop {
        let event = tokio::select! {
            event = client.next_event() => event,
            _ = &mut stop => break,
        };
        let Some(event) = event else { break };
        if matches!(event, Event::Message { .. }) {
            messages += 1;
        }
        println!(
            "{}",
            if args.json {
                event_json(&event)
            } else {
                event_text(&event)
            }
        );
        if let Event::Rejected { rejection, .. } = &event
            && let Some(why) = stop_for(rejection, args.client.token_file.is_some())
        {
            client.close().await;
            anyhow::bail!("sub stops: {why}");
        }
        if args.count.is_some_and(|n| messages >= n) {
            break;
        }
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Why `sub` stops on `rejection` rather than retry, or `None` when a retry may yet work: a
/// token read from a file (`--token-file`) may be renewed, and is read again at each retry.
fn stop_for(rejection: &Rejection, token_file: bool) -> Option<&'static str> {
    match rejection {
        Rejection::Certificate(_) => {
            Some("retrying cannot fix a refused certificate (fix it, or --ca-file)")
        }
        Rejection::Token { .. } | Rejection::Subscription { .. } if token_file => None,
        Rejection::Token { .. } => Some(
            "retrying cannot fix a refused token (a new one can; --token-file is read again at \
             each retry)",
        ),
        Rejection::Subscription { code } if code == "forbidden" => Some(
            "the token does not allow these topics (a new one can; --token-file is read again \
             at each retry)",
        ),
        Rejection::Subscription { .. } => Some("retrying cannot fix a refused subscription"),
        _ => Some("retrying cannot fix this"),
    }
}

/// One line of text per event: messages as `TOPIC PAYLOAD`, connection events behind `#`.
pub(crate) fn event_text(event: &Event) -> String {
    match event {
        Event::Message {
            topic,
            payload,
            position,
        } => match position {
            Some(at) => format!("{topic} {} {}", at.offset, String::from_utf8_lossy(payload)),
            None => format!("{topic} {}", String::from_utf8_lossy(payload)),
        },
        Event::Recovered { topic, count } => {
            format!("# recovered {count} messages of {topic}")
        }
        Event::Feed {
            server,
            complete: false,
        } => format!("# partial feed: {server} is cut off from the farm"),
        Event::Feed {
            server,
            complete: true,
        } => format!("# complete feed: {server} is back in touch with the farm"),
        Event::Gap {
            topic,
            epoch,
            from,
            to,
            reason,
        } => match to {
            Some(to) => {
                format!("# gap in {topic}: offsets {from}..={to} of epoch {epoch} lost ({reason})")
            }
            None => format!("# gap in {topic}: offsets {from}.. of epoch {epoch} lost ({reason})"),
        },
        Event::Connected { server, transport } => format!("# connected {server} over {transport}"),
        Event::Disconnected { server, cause } => format!("# disconnected {server}: {cause}"),
        Event::FailedOver { from, to, took } => {
            format!("# failed over {from} -> {to} in {} ms", took.as_millis())
        }
        Event::Migrated {
            from,
            to,
            reason,
            took,
            ..
        } => format!(
            "# migrated {from} -> {to} ({reason}) in {} ms, nothing missed",
            took.as_millis()
        ),
        Event::MigrationFailed { server, to, error } => {
            format!("# could not migrate to {to}, staying on {server}: {error}")
        }
        Event::Retrying { reason, delay } => {
            format!("# retrying in {} ms: {reason}", delay.as_millis())
        }
        Event::ServerError {
            server,
            code,
            message,
        } => format!("# error from {server}: {code}: {message}"),
        Event::Rejected { error, .. } => format!("# rejected: {error}"),
        other => format!("# {other:?}"),
    }
}

/// One JSON object per event, with an `event` field naming it.
pub(crate) fn event_json(event: &Event) -> String {
    let value = match event {
        Event::Message {
            topic,
            payload,
            position,
        } => {
            let mut value = match std::str::from_utf8(payload) {
                Ok(text) => json!({"event": "message", "topic": topic, "data": text}),
                Err(_) => {
                    use base64::Engine;
                    let data = base64::engine::general_purpose::STANDARD.encode(payload);
                    json!({"event": "message", "topic": topic, "data": data, "encoding": "base64"})
                }
            };
            if let Some(at) = position {
                value["epoch"] = json!(at.epoch.to_string());
                value["offset"] = json!(at.offset);
            }
            value
        }
        Event::Recovered { topic, count } => {
            json!({"event": "recovered", "topic": topic, "count": count})
        }
        Event::Feed { server, complete } => {
            json!({"event": "feed", "server": server, "complete": complete})
        }
        Event::Gap {
            topic,
            epoch,
            from,
            to,
            reason,
        } => json!({
            "event": "gap", "topic": topic, "epoch": epoch.to_string(), "from": from, "to": to,
            "reason": reason
        }),
        Event::Connected { server, transport } => {
            json!({"event": "connected", "server": server, "transport": transport.to_string()})
        }
        Event::Disconnected { server, cause } => {
            json!({"event": "disconnected", "server": server, "reason": cause.to_string()})
        }
        Event::FailedOver { from, to, took } => json!({
            "event": "failed_over", "from": from, "to": to, "took_ms": took.as_secs_f64() * 1e3
        }),
        Event::Migrated {
            from,
            to,
            reason,
            took,
            transport,
        } => json!({
            "event": "migrated", "from": from, "to": to, "reason": reason,
            "took_ms": took.as_secs_f64() * 1e3, "transport": transport.to_string()
        }),
        Event::MigrationFailed { server, to, error } => json!({
            "event": "migration_failed", "server": server, "to": to, "error": error
        }),
        Event::Retrying { reason, delay } => json!({
            "event": "retrying", "reason": reason, "delay_ms": delay.as_secs_f64() * 1e3
        }),
        Event::ServerError {
            server,
            code,
            message,
        } => json!({"event": "server_error", "server": server, "code": code, "message": message}),
        Event::Rejected { rejection, error } => {
            let mut value = json!({"event": "rejected", "error": error});
            match rejection {
                Rejection::Certificate(_) => value["what"] = json!("certificate"),
                Rejection::Token { code } => {
                    value["what"] = json!("token");
                    value["code"] = json!(code);
                }
                Rejection::Subscription { code } => {
                    value["what"] = json!("subscription");
                    value["code"] = json!(code);
                }
                _ => value["what"] = json!("other"),
            }
            value
        }
        other => json!({"event": "other", "debug": format!("{other:?}")}),
    };
    value.to_string()
}

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}: expected e.g. 500ms, 30s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "bad duration unit {unit:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2 days").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn events_print_one_line_each() {
        let msg = Event::Message {
            topic: "t".into(),
            payload: b"hi there".to_vec(),
            position: Some(streamfarm_client::Position::new(
                streamfarm_client::Epoch(0xab),
                7,
            )),
        };
        assert_eq!(event_text(&msg), "t 7 hi there");
        assert_eq!(
            event_json(&msg),
            r#"{"data":"hi there","epoch":"00000000000000ab","event":"message","offset":7,"topic":"t"}"#
        );
        let binary = Event::Message {
            topic: "t".into(),
            payload: vec![0xff],
            position: None,
        };
        assert!(event_json(&binary).contains(r#""encoding":"base64""#));
        let over = Event::FailedOver {
            from: "a".into(),
            to: "b".into(),
            took: Duration::from_millis(12),
        };
        assert_eq!(event_text(&over), "# failed over a -> b in 12 ms");
        let recovered = Event::Recovered {
            topic: "t".into(),
            count: 3,
        };
        assert_eq!(event_text(&recovered), "# recovered 3 messages of t");
        let gap = Event::Gap {
            topic: "t".into(),
            epoch: streamfarm_client::Epoch(1),
            from: 4,
            to: Some(9),
            reason: "history_exceeded".into(),
        };
        assert_eq!(
            event_text(&gap),
            "# gap in t: offsets 4..=9 of epoch 0000000000000001 lost (history_exceeded)"
        );
    }
}
