//! One failover run of nats-server: a three-server cluster on the same addresses, the clients
//! (this crate's minimal client) on one server, reconnecting as nats.go does, and the case's
//! failure inflicted on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::seq::SliceRandom;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::harness::{
    Activity, BlackHole, ClientLog, tally_all, through_failure, until_baseline, watch_survivors,
};
use super::{CLIENTS_SERVER, Case, OTHER_SERVERS, RECOVERY, Run, SAMPLE, TOPIC};
use crate::Options;
use crate::flow::{Publisher, Target, client_source, loopback, now_ms, now_us};
use crate::nats::NatsProc;
use crate::proc::http;
use crate::wire::Nats;
use streamfarm_localfarm::partition::ISOLATED_GID;

pub(super) async fn nats_once(
    options: &Options,
    bin: &std::path::Path,
    case: Case,
) -> anyhow::Result<Run> {
    let c = options.failover_clients;
    let ips = [
        loopback(CLIENTS_SERVER),
        loopback(OTHER_SERVERS[0]),
        loopback(OTHER_SERVERS[1]),
    ];
    let gid = (case == Case::NodePartitioned).then_some(ISOLATED_GID);
    let mut servers = NatsProc::cluster_with_gid(bin, &ips, gid).await?;
    let victim_addr = servers[0].addr;
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let activity = Arc::new(Activity::default());
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..c).map(|_| Arc::default()).collect();
    let back = Arc::new(AtomicUsize::new(0));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c);
    let mut clients: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for (i, log) in logs.iter().enumerate() {
        let (lost_at, activity, log, back, connected) = (
            lost_at.clone(),
            activity.clone(),
            log.clone(),
            back.clone(),
            connected_tx.clone(),
        );
        clients.spawn(async move {
            let mut nats = Nats::connect(victim_addr, Some(client_source(i))).await?;
            nats.subscribe(TOPIC, 1).await?;
            connected.send(()).await?;
            drop(connected);
            let mut buf = Vec::new();
            loop {
                while let Ok(event) = nats.next(&mut buf).await {
                    if event == crate::wire::NatsEvent::Msg {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        activity.received(&mut log, &buf, now_ms());
                    }
                }
                let Some(at) = *lost_at.lock().unwrap_or_else(|p| p.into_inner()) else {
                    anyhow::bail!("lost nats-server before the failure");
                };
                // The pool: learned urls, shuffled, the lost server last.
                let lost = nats.writer.peer_addr().unwrap_or(victim_addr);
                let mut pool: Vec<SocketAddr> = nats
                    .connect_urls
                    .iter()
                    .filter_map(|u| u.parse().ok())
                    .filter(|a| *a != lost)
                    .collect();
                pool.shuffle(&mut rand::rng());
                pool.push(lost);
                let deadline = at + RECOVERY;
                let mut fresh = None;
                'rounds: while Instant::now() < deadline {
                    for addr in &pool {
                        if let Ok(mut conn) = Nats::connect(*addr, Some(client_source(i))).await
                            && conn.subscribe(TOPIC, 1).await.is_ok()
                        {
                            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                            if log.back_ms.is_none() && *addr != victim_addr {
                                log.back_ms = Some(now_ms());
                                back.fetch_add(1, Ordering::Relaxed);
                            }
                            fresh = Some(conn);
                            break 'rounds;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                match fresh {
                    Some(conn) => nats = conn,
                    None => anyhow::bail!("no nats-server within {RECOVERY:?}"),
                }
            }
        });
    }
    drop(connected_tx);
    for _ in 0..c {
        tokio::time::timeout(Duration::from_secs(60), connected_rx.recv())
            .await
            .context("nats clients did not all connect within 60 s")?;
    }
    let mut publish_on = vec![servers[1].addr, servers[2].addr];
    if case == Case::PublisherNodeKilled {
        publish_on.push(victim_addr);
    }
    let target = Target::Nats {
        servers: publish_on,
        subject: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.publish_rate)?;
    activity.until_warm(c).await?;
    let from_seq = publisher.next_seq();

    let done = Arc::new(tokio::sync::Notify::new());
    let survivors: Vec<(SocketAddr, SocketAddr)> =
        servers[1..].iter().map(|s| (s.addr, s.monitor)).collect();
    let baselined = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let baseline = baselined.clone();
        tokio::spawn(async move {
            watch_survivors(
                survivors.len(),
                |i| {
                    let monitor = survivors[i].1;
                    async move {
                        let body = http(monitor, "GET", "/varz", &[], "").await.ok()?;
                        let varz: serde_json::Value = serde_json::from_str(&body).ok()?;
                        varz.get("total_connections")?.as_f64()
                    }
                },
                done,
                baseline,
            )
            .await
        })
    };
    until_baseline(&baselined).await?;
    *lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let loss_us = now_us();
    activity.failed.store(true, Ordering::Relaxed);
    let failing = if case == Case::PublisherNodeKilled {
        1
    } else {
        0
    };
    let failing_addr = servers[failing].addr;
    let other_ips = [ips[1], ips[2]];
    let (hole, ledger) = through_failure(
        options,
        case,
        (&mut servers[failing].guard, failing_addr),
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
    let dead_attempts = hole.as_ref().map_or(0, BlackHole::attempts);
    drop(hole);
    clients.abort_all();
    while clients.join_next().await.is_some() {}
    let loss_ms = (loss_us / 1000) as u32;
    let (tallies, times_ms, slow_consumer_closes) = tally_all(&logs, &ledger, from_seq, loss_ms);
    Ok(Run {
        times_ms,
        dead_attempts: dead_attempts as f64,
        survivor_attempts: accepted,
        dials: None,
        peak_per_s: peak,
        clients: c,
        tallies,
        ledger,
        from_seq,
        loss_us,
        slow_consumer_closes,
        listed_down_ms: None,
    })
}
