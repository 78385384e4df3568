//! The NATS relay against a real `nats-server` (on `PATH`; `scripts/test.sh` installs it): no
//! relay links, messages across nodes, a NATS restart while publishing, a dead peer noticed
//! through NATS, and frames from outsiders on NATS refused. The farm tests (`farm.rs`) run on
//! NATS too, with `STREAMFARM_TEST_RELAY=nats`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use streamfarm_core::Status;
use streamfarm_node::{NodeConfig, NodeHandle};
use support::nats::{NatsServer, use_nats};
use support::*;
use tokio::time::{Instant, timeout};

/// Nodes `n1`… on 127.0.0.1… relaying through `nats`, each listed UP by all.
async fn nats_farm(
    nats: &NatsServer,
    count: u8,
    secret: Option<&str>,
    tweak: impl Fn(&mut NodeConfig),
) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 1..=count {
        let seeds: Vec<SocketAddr> = nodes.first().map(|n| n.gossip_addr()).into_iter().collect();
        let mut config = config(&format!("n{i}"), [127, 0, 0, i], &seeds, secret);
        use_nats(&mut config, &nats.url());
        tweak(&mut config);
        nodes.push(start(config).await);
    }
    all_up(&nodes).await;
    nodes
}

async fn all_up(nodes: &[NodeHandle]) {
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    for node in nodes {
        let farm = node.farm();
        eventually(Duration::from_secs(10), "every node UP", || {
            let list = farm.borrow();
            names.iter().all(|n| status(&list, n) == Some(Status::Up))
        })
        .await;
    }
}

/// The value of gauge or counter `name` in a node's `/metrics`.
async fn metric(node: &NodeHandle, name: &str) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", node.listen_addr()))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("streamfarm_{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .expect("a number")
}

/// A topic named `prefix…` whose replica is `replica` as `node` sees the farm
/// (`GET /topics/{topic}`): the tests below need its messages to come from that node over NATS.
async fn topic_replicated_by(node: &NodeHandle, replica: &str, prefix: &str) -> String {
    for i in 0..200 {
        let topic = format!("{prefix}{i}");
        let text = reqwest::get(format!("http://{}/topics/{topic}", node.listen_addr()))
            .await
            .expect("topic info answers")
            .text()
            .await
            .expect("topic info text");
        let info: serde_json::Value = serde_json::from_str(&text).expect("topic info is JSON");
        if info["replica"] == replica {
            return topic;
        }
    }
    panic!("no topic {prefix}… has {replica} as its replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_links_are_counted_and_a_farm_on_nats_has_none() {
    // The embedded relay links every node to every other: the gauge counts them.
    let (a, b) = two_nodes(|_| {}).await;
    let (ga, gb) = (a.listen_addr(), b.listen_addr());
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&a, "relay_links").await + metric(&b, "relay_links").await < 2 {
        assert!(Instant::now() < deadline, "embedded links counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((a, b, ga, gb));

    let nats = NatsServer::start([127, 0, 0, 8]);
    let nodes = nats_farm(&nats, 3, None, |_| {}).await;
    // Replicated by the publishing node: each message crosses NATS to both others.
    let across = topic_replicated_by(&nodes[0], nodes[0].name(), "across").await;
    let mut controls = Vec::new();
    for node in &nodes[1..] {
        controls.push(Control::on(node, &across).await);
    }
    let sent = publish(&nodes[0], &across, "m", 20).await;
    for control in controls {
        control.finish(&sent).await;
    }
    for node in &nodes {
        assert_eq!(metric(node, "relay_links").await, 0, "{}", node.name());
        // Nobody dials the relay endpoint, and there is none to dial.
        let refused = tokio_tungstenite::connect_async(format!(
            "ws://{}/internal/relay?node=x",
            node.listen_addr()
        ))
        .await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 404)
            }
            other => panic!("no relay endpoint on NATS: {:?}", other.map(|_| ())),
        }
    }
    let received: u64 = nodes
        .iter()
        .map(|n| load(&n.metrics().relay_messages_in))
        .sum();
    assert!(received >= 40, "the messages crossed over NATS: {received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_while_publishing_loses_and_duplicates_nothing() {
    let mut nats = NatsServer::start([127, 0, 0, 7]);
    let nodes = nats_farm(&nats, 3, None, |_| {}).await;
    let topics = ["r1", "r2", "r3"];
    let mut controls = Vec::new();
    for node in &nodes {
        for topic in topics {
            controls.push((topic, Control::on(node, topic).await));
        }
    }
    // Published from every node, one at a time per topic, while NATS goes away and comes back.
    let nodes = std::sync::Arc::new(nodes);
    let publishers: Vec<_> = topics
        .iter()
        .enumerate()
        .map(|(i, topic)| {
            let nodes = nodes.clone();
            let topic = topic.to_string();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for k in 0..60 {
                    let message = format!("{topic}-{k}");
                    nodes[(i + k) % 3]
                        .publish(&topic, &message)
                        .await
                        .unwrap_or_else(|err| panic!("{message}: {err}"));
                    sent.push(message);
                }
                sent
            })
        })
        .collect();
    // Killed once every topic is on its way; started again on the same port.
    for (_, control) in &mut controls {
        control.has(10).await;
    }
    let addr = nats.addr();
    nats.kill();
    let down = Instant::now();
    // Started again once every node has noticed (publishes wait meanwhile).
    for node in nodes.iter() {
        eventually(
            Duration::from_secs(10),
            "the node notices NATS is gone",
            || load(&node.metrics().relay_disconnects) >= 1,
        )
        .await;
    }
    // The outage itself (a scenario's length, not a wait for something): publishes made
    // meanwhile are held by their origins and resent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats = NatsServer::start_on(addr);
    eprintln!("nats-server down for {:?}", down.elapsed());
    let mut sent = std::collections::HashMap::new();
    for (topic, publisher) in topics.iter().zip(publishers) {
        let messages = timeout(Duration::from_secs(60), publisher)
            .await
            .expect("publishing ends")
            .expect("every publish acknowledged");
        sent.insert(*topic, messages);
    }
    // Every subscriber on every node: all of them, in order, once.
    for (topic, control) in controls {
        control.finish(&sent[topic]).await;
    }
    let nodes = std::sync::Arc::try_unwrap(nodes).unwrap_or_else(|_| panic!("publishers done"));
    for node in nodes {
        node.shutdown().await;
    }
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_leaves_the_placements_through_nats_before_the_failure_timeout() {
    let nats = NatsServer::start([127, 0, 0, 6]);
    // A failure timeout of 20 s: only the probe through NATS can move the topic sooner.
    let mut nodes = nats_farm(&nats, 3, None, |c| c.failure_timeout_ms = 20_000).await;
    // A topic sequenced on n3, which is then killed.
    let mut topic = String::new();
    for i in 0.. {
        topic = format!("k{i}");
        if sequencer(&nodes[0], &topic).await == "n3" {
            break;
        }
    }
    let mut control = Control::on(&nodes[1], &topic).await;
    let first = publish(&nodes[0], &topic, "before", 3).await;
    control.has(3).await;
    // Dropped: its connection to NATS ends, as a killed process's would.
    drop(nodes.pop());
    let killed = Instant::now();
    let after = publish(&nodes[0], &topic, "after", 3).await;
    let took = killed.elapsed();
    eprintln!("sequencer killed: next publishes acknowledged after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the topic moved before the failure timeout: {took:?}"
    );
    let expected: Vec<String> = first.into_iter().chain(after).collect();
    control.finish(&expected).await;
}

/// The sequencer of `topic` as `node` sees the farm (`GET /topics/{topic}`).
async fn sequencer(node: &NodeHandle, topic: &str) -> String {
    let text = reqwest::get(format!("http://{}/topics/{topic}", node.listen_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    body["sequencer"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_on_nats_without_the_farm_secret_can_neither_inject_nor_replay() {
    let nats = NatsServer::start([127, 0, 0, 5]);
    let nodes = nats_farm(&nats, 2, Some(SECRET), |_| {}).await;
    // Replicated by n1: n2 gets its messages over NATS, where the outsider records them.
    let guarded = topic_replicated_by(&nodes[0], nodes[0].name(), "guarded").await;
    let mut control = Control::on(&nodes[1], &guarded).await;
    let sent = publish(&nodes[0], &guarded, "real", 3).await;
    control.has(3).await;

    // An outsider with NATS access, listening to everything and then sending.
    let outsider = async_nats::connect(nats.url()).await.expect("connects");
    let mut everything = outsider.subscribe(">").await.unwrap();
    let more = publish(&nodes[0], &guarded, "seen", 1).await;
    let recorded = timeout(Duration::from_secs(5), async {
        use futures_util::StreamExt;
        loop {
            let message = everything.next().await.expect("subscribed");
            if message.subject.as_str().contains(".topic.")
                && std::str::from_utf8(&message.payload)
                    .unwrap()
                    .contains("seen-0")
            {
                return message;
            }
        }
    })
    .await
    .expect("the outsider sees the farm's frames (NATS credentials keep it out, not the secret)");
    let before = load(&nodes[1].metrics().relay_auth_failures);
    // A forged message: the frame of the next offset, without a tag.
    let forged = String::from_utf8(recorded.payload.to_vec())
        .unwrap()
        .replace("seen-0", "forged");
    let forged = forged.replacen("\"offset\":4", "\"offset\":5", 1);
    outsider
        .publish(recorded.subject.clone(), forged.clone().into())
        .await
        .unwrap();
    // The recorded frame itself, replayed with its headers (a valid tag, seen before).
    outsider
        .publish_with_headers(
            recorded.subject.clone(),
            recorded.headers.clone().unwrap(),
            recorded.payload.clone(),
        )
        .await
        .unwrap();
    // A forged broker frame to n2's node subject.
    let node_subject = recorded
        .subject
        .as_str()
        .replace(&format!(".topic.{guarded}"), ".node.n2");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Sf-From", "n1");
    outsider
        .publish_with_headers(
            node_subject,
            headers,
            format!(r#"{{"type":"fenced","topic":"{guarded}","term":99}}"#).into(),
        )
        .await
        .unwrap();
    outsider.flush().await.unwrap();
    eventually(Duration::from_secs(5), "three frames refused", || {
        load(&nodes[1].metrics().relay_auth_failures) >= before + 3
    })
    .await;
    let last = publish(&nodes[0], &guarded, "after", 2).await;
    let expected: Vec<String> = sent.into_iter().chain(more).chain(last).collect();
    control.finish(&expected).await;
}
