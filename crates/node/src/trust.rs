//! Trust between nodes: the farm secret, and what it authenticates — every gossip datagram and
//! every relay link.
//!
//! Nodes of one farm share a secret (`farm_secret` or `farm_secret_file`, at least
//! [`MIN_SECRET_BYTES`] bytes). From it each node derives two keys, one per use, bound to the
//! cluster name (HMAC-SHA256 of a label under the secret), so a key never serves two protocols and
//! two farms with the same secret but different cluster names do not trust each other:
//!
//! - **Gossip** ([`SignedUdp`]): each datagram is the chitchat envelope followed by
//!   `HMAC-SHA256(gossip key, envelope)` (32 bytes). A datagram whose tag does not verify (in
//!   constant time) is dropped *before* it is decoded or decompressed, and counted
//!   (`streamfarm_gossip_rejected_total`). Decoding is bounded anyway (the patched chitchat
//!   refuses a stream that inflates beyond 1 MiB), so even a farm without a secret is not open
//!   to a decompression bomb.
//! - **Relay links** ([`RelayAuth`]): a challenge and response over the link before anything else.
//!   The acceptor sends a fresh random nonce; the dialer answers with its name, its incarnation
//!   (the start time of its process, in ms) and its own nonce, under an HMAC of both nonces and
//!   both names; the acceptor answers with an HMAC that proves it knows the key too. A proof
//!   covers both fresh nonces, so a recorded handshake cannot be replayed, and both names, so a
//!   proof made for one pair of nodes is worth nothing for another. See `docs/PROTOCOL.md`.
//!
//! What the secret does not give: the secret is the farm's, not a node's — any holder can claim
//! any name. Confidentiality (TLS) is not provided: an eavesdropper on the network between
//! nodes reads the messages. See `SECURITY.md`.
//!
//! With no secret, node traffic is not authenticated (the default, so the demo needs no keys):
//! the node logs a warning once at start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::{debug, warn};

use crate::metrics;

type HmacSha256 = Hmac<Sha256>;

/// Shortest farm secret accepted, in bytes: 128 bits if it is random.
pub(crate) const MIN_SECRET_BYTES: usize = 16;
/// Bytes of the tag after each gossip datagram.
pub(crate) const TAG_BYTES: usize = 32;
/// Largest datagram read: the UDP payload limit.
const MAX_DATAGRAM: usize = 65_507;

/// The keys derived from the farm secret. Never logged.
#[derive(Clone)]
pub(crate) struct FarmKeys {
    gossip: [u8; 32],
    relay: [u8; 32],
    nats: [u8; 32],
}

impl std::fmt::Debug for FarmKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FarmKeys(..)")
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")
}

/// Feeds length-prefixed fields, so that no two sequences of fields give the same input.
fn feed(mac: &mut HmacSha256, fields: &[&[u8]]) {
    for field in fields {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field);
    }
}

impl FarmKeys {
    /// Derives the keys of `cluster` from the farm secret.
    pub(crate) fn derive(secret: &[u8], cluster: &str) -> Self {
        let derive = |label: &str| {
            let mut m = mac(secret);
            feed(&mut m, &[label.as_bytes(), cluster.as_bytes()]);
            m.finalize().into_bytes().into()
        };
        FarmKeys {
            gossip: derive("streamfarm gossip v1"),
            relay: derive("streamfarm relay v1"),
            nats: derive("streamfarm nats v1"),
        }
    }

    fn gossip_tag(&self, payload: &[u8]) -> [u8; TAG_BYTES] {
        let mut m = mac(&self.gossip);
        m.update(payload);
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `payload` (compared in constant time).
    fn gossip_verifies(&self, payload: &[u8], tag: &[u8]) -> bool {
        let mut m = mac(&self.gossip);
        m.update(payload);
        m.verify_slice(tag).is_ok()
    }
}

/// A random nonce, hex-encoded (32 bytes from the OS-seeded generator).
pub(crate) fn nonce() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 256 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The relay handshake's proofs (see the module docs and `docs/PROTOCOL.md`).
#[derive(Debug, Clone)]
pub(crate) struct RelayAuth {
    keys: FarmKeys,
}

/// Which side of a handshake a proof is for: a dialer's proof cannot be reflected as an
/// acceptor's.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Side {
    /// The dialer's `hello`.
    Hello,
    /// The acceptor's `welcome`.
    Welcome,
}

/// Everything a relay handshake proof covers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transcript<'a> {
    /// The node that accepts the link.
    pub(crate) acceptor: &'a str,
    /// Its nonce (the `challenge`).
    pub(crate) acceptor_nonce: &'a str,
    /// The node that dials it.
    pub(crate) dialer: &'a str,
    /// The dialer's incarnation (start time of its process, ms).
    pub(crate) incarnation: u64,
    /// The dialer's nonce.
    pub(crate) dialer_nonce: &'a str,
    /// Keying material of the link's TLS session (`crate::tls::binding`); empty on a plain
    /// link. A man in the middle holds two sessions, so its two sides' proofs cannot match.
    pub(crate) binding: &'a [u8],
}

impl RelayAuth {
    pub(crate) fn new(keys: FarmKeys) -> Self {
        RelayAuth { keys }
    }

    fn mac(&self, side: Side, t: &Transcript<'_>) -> HmacSha256 {
        let mut m = mac(&self.keys.relay);
        let label: &[u8] = match side {
            Side::Hello => b"hello",
            Side::Welcome => b"welcome",
        };
        feed(
            &mut m,
            &[
                label,
                t.acceptor.as_bytes(),
                t.acceptor_nonce.as_bytes(),
                t.dialer.as_bytes(),
                &t.incarnation.to_be_bytes(),
                t.dialer_nonce.as_bytes(),
                t.binding,
            ],
        );
        m
    }

    /// The proof `side` sends, hex-encoded.
    pub(crate) fn prove(&self, side: Side, transcript: &Transcript<'_>) -> String {
        hex(&self.mac(side, transcript).finalize().into_bytes())
    }

    /// Whether `proof` (hex) is `side`'s proof of `transcript`, compared in constant time.
    pub(crate) fn verify(&self, side: Side, transcript: &Transcript<'_>, proof: &str) -> bool {
        match unhex(proof) {
            Some(bytes) => self.mac(side, transcript).verify_slice(&bytes).is_ok(),
            None => false,
        }
    }
}

/// How far an upgrade ticket's time may be from the acceptor's clock, ms: clocks of a farm's
/// machines agree far better; a captured ticket is good for no longer.
pub(crate) const TICKET_WINDOW_MS: u64 = 120_000;

impl RelayAuth {
    fn ticket_mac(&self, acceptor: &str, dialer: &str, at_ms: u64, binding: &[u8]) -> HmacSha256 {
        let mut m = mac(&self.keys.relay);
        feed(
            &mut m,
            &[
                b"upgrade",
                acceptor.as_bytes(),
                dialer.as_bytes(),
                &at_ms.to_be_bytes(),
                binding,
            ],
        );
        m
    }

    /// The ticket a dialer sends with its upgrade request (`at_ms.proof`), so that the acceptor
    /// upgrades only a holder of the farm secret: an outsider is refused before it can send any
    /// WebSocket message (see the challenge that follows for the link's own proofs).
    pub(crate) fn ticket(
        &self,
        acceptor: &str,
        dialer: &str,
        at_ms: u64,
        binding: &[u8],
    ) -> String {
        let proof = self.ticket_mac(acceptor, dialer, at_ms, binding);
        format!("{at_ms}.{}", hex(&proof.finalize().into_bytes()))
    }

    /// Checks an upgrade ticket at `now_ms`; why not, if it does not verify.
    pub(crate) fn check_ticket(
        &self,
        ticket: Option<&str>,
        acceptor: &str,
        dialer: &str,
        now_ms: u64,
        binding: &[u8],
    ) -> Result<(), &'static str> {
        let ticket = ticket.ok_or("no relay ticket: does the dialer have the farm secret?")?;
        let (at, proof) = ticket.split_once('.').ok_or("malformed relay ticket")?;
        let at_ms: u64 = at.parse().map_err(|_| "malformed relay ticket")?;
        if at_ms.abs_diff(now_ms) > TICKET_WINDOW_MS {
            return Err("relay ticket out of time: are the clocks of the two machines right?");
        }
        let proof = unhex(proof).ok_or("malformed relay ticket")?;
        self.ticket_mac(acceptor, dialer, at_ms, binding)
            .verify_slice(&proof)
            .map_err(|_| "relay ticket does not verify: wrong or no farm secret")
    }
}

/// The tags of frames sent through NATS (`crate::relay::nats`): there is no link to run a
/// handshake on, so every frame carries its own proof — an HMAC, under a key of its own, of the
/// subject, the sender's name, incarnation and sequence number, the time it was sent and the
/// payload. The sequence number and time let the receiver refuse a frame replayed.
#[derive(Debug, Clone)]
pub(crate) struct NatsAuth {
    keys: FarmKeys,
}

/// Everything a NATS frame's tag covers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NatsFrame<'a> {
    pub(crate) subject: &'a str,
    pub(crate) from: &'a str,
    pub(crate) incarnation: u64,
    pub(crate) seq: u64,
    pub(crate) sent_ms: u64,
    pub(crate) payload: &'a [u8],
}

impl NatsAuth {
    pub(crate) fn new(keys: FarmKeys) -> Self {
        NatsAuth { keys }
    }

    fn mac(&self, f: &NatsFrame<'_>) -> HmacSha256 {
        let mut m = mac(&self.keys.nats);
        feed(
            &mut m,
            &[
                f.subject.as_bytes(),
                f.from.as_bytes(),
                &f.incarnation.to_be_bytes(),
                &f.seq.to_be_bytes(),
                &f.sent_ms.to_be_bytes(),
                f.payload,
            ],
        );
        m
    }

    /// The tag of `frame`, hex-encoded.
    pub(crate) fn tag(&self, frame: &NatsFrame<'_>) -> String {
        hex(&self.mac(frame).finalize().into_bytes())
    }

    /// Whether `tag` (hex) is the tag of `frame`, compared in constant time.
    pub(crate) fn verify(&self, frame: &NatsFrame<'_>, tag: &str) -> bool {
        match unhex(tag) {
            Some(bytes) => self.mac(frame).verify_slice(&bytes).is_ok(),
            None => false,
        }
    }
}

/// Gossip over UDP with every datagram authenticated by the farm key, when there is one.
/// Without a key it is plain chitchat UDP, still counting what it cannot decode.
pub(crate) struct SignedUdp {
    keys: Option<FarmKeys>,
    /// Datagrams dropped: failed authentication, or not a chitchat envelope.
    rejected: Arc<AtomicU64>,
}

impl SignedUdp {
    pub(crate) fn new(keys: Option<FarmKeys>, rejected: Arc<AtomicU64>) -> Self {
        SignedUdp { keys, rejected }
    }
}

#[async_trait]
impl Transport for SignedUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .map_err(|err| {
                anyhow::anyhow!("failed to bind to {listen_addr}/UDP for gossip: {err}")
            })?;
        Ok(Box::new(SignedSocket {
            socket,
            keys: self.keys.clone(),
            rejected: self.rejected.clone(),
            buf_send: Vec::with_capacity(MAX_DATAGRAM),
            buf_recv: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            warned: false,
        }))
    }
}

struct SignedSocket {
    socket: tokio::net::UdpSocket,
    keys: Option<FarmKeys>,
    rejected: Arc<AtomicU64>,
    buf_send: Vec<u8>,
    buf_recv: Box<[u8]>,
    /// Whether a rejected datagram was logged at `warn` already (later ones at `debug`).
    warned: bool,
}

impl SignedSocket {
    fn reject(&mut self, from: SocketAddr, len: usize, why: &str) {
        metrics::inc(&self.rejected);
        if self.warned {
            debug!(%from, len, why, "gossip datagram dropped");
        } else {
            self.warned = true;
            warn!(%from, len, why, "gossip datagram dropped (further ones are logged at debug level and counted in streamfarm_gossip_rejected_total)");
        }
    }
}

/// Whether a receive error leaves the socket usable (as chitchat's own UDP transport judges).
fn is_transient(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::OutOfMemory
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
    )
}

#[async_trait]
impl Socket for SignedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.buf_send.clear();
        envelope.serialize(&mut self.buf_send);
        if let Some(keys) = &self.keys {
            let tag = keys.gossip_tag(&self.buf_send);
            self.buf_send.extend_from_slice(&tag);
        }
        let num_bytes_sent = self
            .socket
            .send_to(&self.buf_send, to)
            .await
            .map_err(|err| anyhow::anyhow!("failed to send gossip to {to}: {err}"))?;
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buf_recv).await {
                Ok(received) => received,
                Err(err) if is_transient(&err) => continue,
                Err(err) => return Err(anyhow::anyhow!("fatal UDP recv error: {err}")),
            };
            let datagram = &self.buf_recv[..len];
            let payload = match &self.keys {
                Some(keys) => {
                    let Some(split) = len.checked_sub(TAG_BYTES) else {
                        self.reject(from, len, "shorter than its authentication tag");
                        continue;
                    };
                    let (payload, tag) = datagram.split_at(split);
                    if !keys.gossip_verifies(payload, tag) {
                        self.reject(from, len, "authentication failed");
                        continue;
                    }
                    payload
                }
                None => datagram,
            };
            let mut cursor = payload;
            match ChitchatEnvelope::deserialize(&mut cursor) {
                Ok(envelope) => {
                    return Ok(RecvOutcome {
                        from_addr: from,
                        envelope,
                        num_bytes_received: len,
                    });
                }
                Err(err) => {
                    let why = format!("not a gossip message: {err:#}");
                    self.reject(from, len, &why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(dialer: &'a str, incarnation: u64) -> Transcript<'a> {
        Transcript {
            acceptor: "a",
            acceptor_nonce: "0011",
            dialer,
            incarnation,
            dialer_nonce: "2233",
            binding: b"",
        }
    }

    #[test]
    fn upgrade_tickets_bind_names_time_session_and_key() {
        let auth = RelayAuth::new(FarmKeys::derive(b"0123456789abcdef", "farm"));
        let now = 1_800_000_000_000;
        let ticket = auth.ticket("a", "b", now, b"session");
        assert_eq!(
            auth.check_ticket(Some(&ticket), "a", "b", now + 1_000, b"session"),
            Ok(())
        );
        let refused = |ticket: Option<&str>, acceptor, dialer, at, binding: &[u8]| {
            auth.check_ticket(ticket, acceptor, dialer, at, binding)
                .is_err()
        };
        assert!(refused(None, "a", "b", now, b"session"));
        assert!(refused(Some(&ticket), "a", "c", now, b"session"));
        assert!(refused(Some(&ticket), "x", "b", now, b"session"));
        assert!(refused(Some(&ticket), "a", "b", now, b"another session"));
        assert!(refused(
            Some(&ticket),
            "a",
            "b",
            now + TICKET_WINDOW_MS + 1,
            b"session"
        ));
        for bad in ["", ".", "1.zz", "x.00", "99999999999999999999999.00"] {
            assert!(refused(Some(bad), "a", "b", now, b"session"), "{bad:?}");
        }
        let other = RelayAuth::new(FarmKeys::derive(b"0123456789abcdeX", "farm"));
        assert!(
            other
                .check_ticket(Some(&ticket), "a", "b", now, b"session")
                .is_err()
        );
    }

    #[test]
    fn relay_proofs_bind_names_nonces_side_and_key() {
        let auth = RelayAuth::new(FarmKeys::derive(b"0123456789abcdef", "farm"));
        let proof = auth.prove(Side::Hello, &transcript("b", 7));
        assert!(auth.verify(Side::Hello, &transcript("b", 7), &proof));
        // Another name, incarnation or side: refused.
        assert!(!auth.verify(Side::Hello, &transcript("c", 7), &proof));
        assert!(!auth.verify(Side::Hello, &transcript("b", 8), &proof));
        assert!(!auth.verify(Side::Welcome, &transcript("b", 7), &proof));
        // Another TLS session (a man in the middle): refused.
        let relayed = Transcript {
            binding: b"another session",
            ..transcript("b", 7)
        };
        assert!(!auth.verify(Side::Hello, &relayed, &proof));
        // Another secret or cluster: refused.
        let other = RelayAuth::new(FarmKeys::derive(b"0123456789abcdeX", "farm"));
        assert!(!other.verify(Side::Hello, &transcript("b", 7), &proof));
        let other = RelayAuth::new(FarmKeys::derive(b"0123456789abcdef", "farm2"));
        assert!(!other.verify(Side::Hello, &transcript("b", 7), &proof));
        // Garbage: refused, no panic.
        for bad in ["", "zz", "0", &"00".repeat(500)] {
            assert!(!auth.verify(Side::Hello, &transcript("b", 7), bad));
        }
    }

    /// CPU time of this thread so far (user + system), ms, where Linux tells it.
    fn thread_cpu_ms() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks * 10)
    }

    /// A gossip datagram whose delta is ~60 KiB of compressed blocks of zeros: unbounded, it
    /// would inflate to ~150 MB.
    fn bomb() -> Vec<u8> {
        let block = zstd::bulk::compress(&vec![0u8; 65_535], 19).unwrap();
        let mut datagram = Vec::new();
        datagram.extend(45_139u16.to_le_bytes());
        datagram.push(0); // protocol version
        datagram.push(2); // Ack
        while datagram.len() + block.len() + 4 < 60_000 {
            datagram.push(1); // a compressed block
            datagram.extend((block.len() as u16).to_le_bytes());
            datagram.extend(&block);
        }
        datagram.push(0); // no more blocks
        datagram
    }

    /// CPU per datagram for receiving `count` bombs, then one valid envelope, on one thread.
    async fn cost_of_bombs(keys: Option<FarmKeys>, count: u64) -> Option<f64> {
        let rejected = Arc::new(AtomicU64::new(0));
        let transport = SignedUdp::new(keys, rejected.clone());
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut receiver = transport.open(any).await.unwrap();
        let mut sender = transport.open(any).await.unwrap();
        let to = receiver.local_addr().unwrap();
        let attacker = tokio::net::UdpSocket::bind(any).await.unwrap();
        let bomb = bomb();
        let before = thread_cpu_ms()?;
        for _ in 0..count {
            attacker.send_to(&bomb, to).await.unwrap();
            // One at a time: the receive buffer holds only a few.
            let mut wait = Box::pin(receiver.recv());
            let timed_out = tokio::time::timeout(std::time::Duration::from_millis(1), &mut wait)
                .await
                .is_err();
            assert!(timed_out, "a bomb was taken for a message");
        }
        let valid = ChitchatEnvelope {
            version: chitchat::ProtocolVersion::V0,
            message: chitchat::ChitchatMessage::BadCluster,
        };
        sender.send(to, valid).await.unwrap();
        let received = receiver.recv().await.unwrap();
        assert_eq!(
            received.envelope.message,
            chitchat::ChitchatMessage::BadCluster
        );
        let after = thread_cpu_ms()?;
        assert_eq!(rejected.load(std::sync::atomic::Ordering::Relaxed), count);
        Some((after - before) as f64 / count as f64)
    }

    #[tokio::test]
    async fn an_inflating_datagram_costs_well_under_10_ms_with_or_without_a_secret() {
        let keys = FarmKeys::derive(b"0123456789abcdef", "farm");
        for (keys, what) in [(Some(keys), "with a secret"), (None, "without a secret")] {
            if let Some(per_datagram) = cost_of_bombs(keys, 100).await {
                println!("~60 KiB bomb, {what}: {per_datagram:.2} ms CPU each");
                assert!(per_datagram < 10.0, "{what}: {per_datagram} ms per bomb");
            }
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert_eq!(nonce().len(), 64);
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn gossip_tags_verify_only_the_same_payload() {
        let keys = FarmKeys::derive(b"0123456789abcdef", "farm");
        let tag = keys.gossip_tag(b"payload");
        assert!(keys.gossip_verifies(b"payload", &tag));
        assert!(!keys.gossip_verifies(b"payloae", &tag));
        assert!(!keys.gossip_verifies(b"payload", &tag[..31]));
    }
}
