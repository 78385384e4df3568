//! One failover run of streamfarm: three child nodes, the clients (the real `streamfarm-client`)
//! on one of them, the publisher on another, and the case's failure inflicted on the clients' node
//! (or the publisher's).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use streamfarm_client::{ClientOptions, Dials, Event, LossCause, RetryMode, ServiceAddress};
use streamfarm_core::protocol::close;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::harness::{
    Activity, BlackHole, ClientLog, listed_down, tally_all, through_failure, until_baseline,
    watch_survivors,
};
use super::{
    CLIENTS_SERVER, Case, LEARN_THE_FARM, OTHER_SERVERS, Run, SAMPLE, TOPIC, add_dials, dials_since,
};
use crate::Options;
use crate::flow::{Publisher, Target, client_source, loopback, now_ms, now_us};
use crate::proc::{NodeProc, NodeSpec, free_port, http, poll};
use streamfarm_localfarm::partition::ISOLATED_GID;

pub(super) async fn streamfarm_once(
    options: &Options,
    retry: RetryMode,
    case: Case,
) -> anyhow::Result<Run> {
    let c = options.failover_clients;
    let clients_addr = free_port(loopback(CLIENTS_SERVER))?;
    let others = [
        free_port(loopback(OTHER_SERVERS[0]))?,
        free_port(loopback(OTHER_SERVERS[1]))?,
    ];
    let mut spec = NodeSpec::new("v", clients_addr);
    if case == Case::NodePartitioned {
        spec.gid = Some(ISOLATED_GID);
    }
    let mut victim = NodeProc::start(&options.exe, &spec).await?;
    let victim_url = victim.url();
    let service: ServiceAddress = [clients_addr, others[0], others[1]]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .context("service address")?;
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let activity = Arc::new(Activity::default());
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..c).map(|_| Arc::default()).collect();
    let back = Arc::new(AtomicUsize::new(0));
    // Dials before the failure, and from it until back, summed over the clients.
    let dials = Arc::new(Mutex::new((Dials::default(), Dials::default())));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c);
    let mut clients = JoinSet::new();
    for (i, log) in logs.iter().enumerate() {
        let client_options = ClientOptions::new()
            .subscribe([TOPIC])
            .source_address(client_source(i))
            .retry(retry)
            .seed(i as u64 + 1);
        let mut client = streamfarm_client::Client::start(service.clone(), client_options);
        let (lost_at, activity, log, back, dials, connected, victim_url) = (
            lost_at.clone(),
            activity.clone(),
            log.clone(),
            back.clone(),
            dials.clone(),
            connected_tx.clone(),
            victim_url.clone(),
        );
        clients.spawn(async move {
            let mut before = Dials::default();
            let mut first = true;
            while let Some(event) = client.next_event().await {
                let server = {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    match &event {
                        Event::Message { payload, .. } => {
                            activity.received(&mut log, payload, now_ms());
                            continue;
                        }
                        Event::Disconnected {
                            cause: LossCause::Closed { code, .. },
                            ..
                        } if *code == close::SLOW_CONSUMER => log.slow_consumer_closes += 1,
                        _ => log.receipts.event(&event),
                    }
                    match event {
                        Event::Connected { server, .. } => server,
                        Event::FailedOver { to, .. } => to,
                        _ => continue,
                    }
                };
                let lost = *lost_at.lock().unwrap_or_else(|p| p.into_inner());
                match lost {
                    None if first => {
                        first = false;
                        before = client.dials();
                        let _ = connected.send(()).await;
                    }
                    Some(_) if server != victim_url => {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        if log.back_ms.is_none() {
                            log.back_ms = Some(now_ms());
                            back.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut d) = dials.lock() {
                                add_dials(&mut d.0, &before);
                                add_dials(&mut d.1, &dials_since(&before, &client.dials()));
                            }
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    drop(connected_tx);
    for _ in 0..c {
        tokio::time::timeout(Duration::from_secs(60), connected_rx.recv())
            .await
            .context("clients did not all connect to the first node within 60 s")?;
    }
    let mut survivors = Vec::new();
    for (i, addr) in others.iter().enumerate() {
        let mut spec = NodeSpec::new(format!("s{i}"), *addr);
        spec.join = vec![clients_addr];
        survivors.push(NodeProc::start(&options.exe, &spec).await?);
    }
    poll(
        "all three nodes listed UP",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let farm = http(clients_addr, "GET", "/farm?format=text", &[], "")
                .await
                .ok()?;
            (farm.matches(" UP ").count() == 3).then_some(())
        },
    )
    .await?;
    let users = victim.metric("streamfarm_connections").await?;
    anyhow::ensure!(users as usize == c, "victim holds {users} of {c} clients");
    // The publisher never publishes on the clients' node: a message then always crosses a link.
    let mut nodes = others.to_vec();
    if case == Case::PublisherNodeKilled {
        nodes.push(clients_addr);
    }
    let target = Target::Streamfarm {
        nodes,
        topic: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.publish_rate)?;
    activity.until_warm(c).await?;
    let from_seq = publisher.next_seq();
    if !options.quick {
        tokio::time::sleep(LEARN_THE_FARM).await;
    }

    let done = Arc::new(tokio::sync::Notify::new());
    let survivor_addrs: Vec<SocketAddr> = survivors.iter().map(|s| s.listen).collect();
    let baselined = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let baseline = baselined.clone();
        tokio::spawn(async move {
            watch_survivors(
                survivor_addrs.len(),
                |i| {
                    let addr = survivor_addrs[i];
                    async move {
                        let text = http(addr, "GET", "/metrics", &[], "").await.ok()?;
                        crate::proc::prometheus_value(
                            &text,
                            "streamfarm_connections_accepted_total",
                        )
                    }
                },
                done,
                baseline,
            )
            .await
        })
    };
    until_baseline(&baselined).await?;
    let at = Instant::now();
    *lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    let loss_us = now_us();
    activity.failed.store(true, Ordering::Relaxed);
    let observer = tokio::spawn(listed_down(others[1], at));
    let (failing, failing_addr) = match case {
        Case::PublisherNodeKilled => (&mut survivors[0].guard, others[0]),
        _ => (&mut victim.guard, clients_addr),
    };
    let other_ips: Vec<IpAddr> = others.iter().map(SocketAddr::ip).collect();
    let (hole, ledger) = through_failure(
        options,
        case,
        (failing, failing_addr),
        &other_ips,
        &back,
        publisher,
        &activity,
    )
    .await?;
    // Let late attempts land in the counters.
    tokio::time::sleep(SAMPLE * 3).await;
    done.notify_one();
    let (accepted, peak) = watcher.await?;
    // Not waited for: a node hung or cut off for less than the failure timeout is never listed
    // down, and the run is over.
    let listed_down_ms = if observer.is_finished() {
        observer.await.ok().flatten()
    } else {
        observer.abort();
        None
    };
    let dead_attempts = hole.as_ref().map_or(0, BlackHole::attempts);
    drop(hole);
    clients.abort_all();
    while clients.join_next().await.is_some() {}
    let loss_ms = (loss_us / 1000) as u32;
    let (tallies, times_ms, slow_consumer_closes) = tally_all(&logs, &ledger, from_seq, loss_ms);
    let dials = dials.lock().map(|d| *d).ok();
    Ok(Run {
        times_ms,
        dead_attempts: dead_attempts as f64,
        survivor_attempts: accepted,
        dials,
        peak_per_s: peak,
        clients: c,
        tallies,
        ledger,
        from_seq,
        loss_us,
        slow_consumer_closes,
        listed_down_ms,
    })
}
