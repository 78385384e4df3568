//! Connect cost: from "connect to the service" to "subscribed".
//!
//! - `seeds method` — the client library (`streamfarm-client`) given the three nodes' addresses
//!   as the service: it reaches one node, reads the farm list that node sends on connecting,
//!   picks a server (`weighted` policy) and connects and subscribes there (the same connection
//!   when it picked the node it reached).
//! - `direct` — this crate's minimal WebSocket client straight to a known node: connect, read
//!   `hello` and `farm`, subscribe.
//! - nats-server `direct` — the minimal NATS client: connect, `INFO`, `CONNECT`, `SUB`, `PING`
//!   answered.
//!
//! Samples run one after another on an otherwise idle farm.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context;
use streamfarm_client::{ClientOptions, Event, ServiceAddress};
use tokio::time::Instant;

use crate::nats::NatsProc;
use crate::proc::{NodeProc, NodeSpec, free_port, http, poll};
use crate::report::{RowBuilder, Section, quantile};
use crate::wire::{Nats, ws_connect, ws_subscribe};
use crate::{NATS, Options, STREAMFARM, ratio};

const TOPIC: &str = "cc";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    let mut section = Section::default();
    let n = options.connect_samples;
    let mut seeds = RowBuilder::default();
    let mut direct = RowBuilder::default();
    let mut nats_row = RowBuilder::default();
    for _ in 0..options.repeats {
        let mut nodes: Vec<NodeProc> = Vec::new();
        for i in 0..3 {
            let mut spec = NodeSpec::new(format!("c{i}"), free_port(ip(1 + i as u8))?);
            if let Some(first) = nodes.first() {
                spec.join = vec![first.listen];
            }
            nodes.push(NodeProc::start(&options.exe, &spec).await?);
        }
        let first = nodes[0].listen;
        poll(
            "three nodes listed UP",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async move {
                let farm = http(first, "GET", "/farm?format=text", &[], "")
                    .await
                    .ok()?;
                (farm.matches(" UP ").count() == 3).then_some(())
            },
        )
        .await?;
        let service: ServiceAddress = nodes
            .iter()
            .map(|n| n.listen.to_string())
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .context("service address")?;

        let mut times = Vec::new();
        for i in 0..n {
            let started = Instant::now();
            let mut client = streamfarm_client::Client::start(
                service.clone(),
                ClientOptions::new().subscribe([TOPIC]).seed(i as u64 + 1),
            );
            let connected = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(event) = client.next_event().await {
                    if matches!(event, Event::Connected { .. }) {
                        return true;
                    }
                }
                false
            })
            .await;
            anyhow::ensure!(matches!(connected, Ok(true)), "client did not connect");
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            client.close().await;
        }
        add(&mut seeds, &mut times);

        for i in 0..n {
            let at = nodes[i % 3].listen;
            let started = Instant::now();
            let mut ws = ws_connect(at, None, 64 * 1024).await?;
            ws_subscribe(&mut ws, TOPIC).await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            let _ = ws.close(None).await;
        }
        add(&mut direct, &mut times);
        drop(nodes);

        if let Some(nats) = &options.nats {
            let server = NatsProc::start(&nats.path, ip(1)).await?;
            for _ in 0..n {
                let started = Instant::now();
                let mut conn = Nats::connect(server.addr, None).await?;
                conn.subscribe(TOPIC, 1).await?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            add(&mut nats_row, &mut times);
        }
    }
    let setting = format!("{n} samples");
    section
        .rows
        .push(seeds.build(STREAMFARM, format!("seeds method, {setting}")));
    section
        .rows
        .push(direct.build(STREAMFARM, format!("direct, {setting}")));
    if options.nats.is_some() {
        section
            .rows
            .push(nats_row.build(NATS, format!("direct, {setting}")));
    }
    let get = |s: &str, f| section.median(STREAMFARM, &format!("{s}, {setting}"), f);
    section.notes.push(format!(
        "seeds method / direct (p50) = {}; streamfarm direct / nats direct (p50) = {}",
        ratio(get("seeds method", "p50_ms"), get("direct", "p50_ms")),
        ratio(
            get("direct", "p50_ms"),
            section.median(NATS, &format!("direct, {setting}"), "p50_ms")
        ),
    ));
    Ok(section)
}

fn add(row: &mut RowBuilder, times: &mut Vec<f64>) {
    times.sort_by(f64::total_cmp);
    if let (Some(p50), Some(p99)) = (quantile(times, 0.5), quantile(times, 0.99)) {
        row.add("p50_ms", p50);
        row.add("p99_ms", p99);
    }
    times.clear();
}
