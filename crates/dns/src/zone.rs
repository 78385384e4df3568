//! The zone: every record the responder can give, built once per change of the farm list.
//!
//! A [`Zone`] is an immutable snapshot. The responder swaps in a new one when the servers' names,
//! urls or statuses change (user counts do not matter to DNS, so they cause no rebuild), and each
//! query only looks records up and rotates a slice: no parsing, no allocation beyond the answer's
//! list of references, no lock held.
//!
//! For the service name `farm.example.` and servers `a` (`ws://10.0.0.1:7400/stream`, UP, group A)
//! and `b` (`ws://10.0.0.2:7400/stream`, UP, group B) the zone holds:
//!
//! ```text
//! farm.example.                     A    10.0.0.1, 10.0.0.2   (UP servers only, rotated)
//! farm.example.                     SRV  0 1 7400 a.farm.example.
//!                                   SRV  1 1 7400 b.farm.example.  (priority = group rank)
//! _streamfarm._tcp.farm.example.    SRV  (the same records under the RFC 2782 name)
//! a.farm.example.                   A    10.0.0.1   (UP or DRAINING; a DOWN node's name has no address)
//! b.farm.example.                   A    10.0.0.2
//! farm.example.                     SOA  farm.example. hostmaster.farm.example. SERIAL ...
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use streamfarm_core::address::{default_port, split_url};
use streamfarm_core::model::{group_comparator, group_order};
use streamfarm_core::{FarmList, ServerEntry, Status};
use tracing::warn;

/// The label pair that, prepended to the service name, gives the RFC 2782 SRV owner name.
pub(crate) const SRV_LABELS: [&str; 2] = ["_streamfarm", "_tcp"];

/// SOA timers (seconds). Nothing transfers this zone, so they only need to be sane values.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// What of a server the zone depends on: a change in anything else (user counts, join rates)
/// leaves the zone as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ZoneKey(Vec<(String, String, Status, String)>);

impl ZoneKey {
    /// The parts of `list` that DNS answers depend on.
    pub(crate) fn of(list: &FarmList) -> Self {
        ZoneKey(
            list.servers
                .iter()
                .map(|s| (s.name.clone(), s.url.clone(), s.status, s.priority.clone()))
                .collect(),
        )
    }
}

/// Monotonic per-record-type counters that decide where each answer starts: one place further
/// per answer. Separate counters, because a stub resolver asks A and AAAA together and one shared
/// counter would then advance by two each lookup (and never rotate a two-server farm).
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    a: AtomicUsize,
    aaaa: AtomicUsize,
    srv: AtomicUsize,
}

impl Rotation {
    /// The counter's value, moved on by one. Relaxed: the counters order nothing else, and two
    /// concurrent answers starting at different places is all rotation needs.
    fn next(counter: &AtomicUsize) -> usize {
        counter.fetch_add(1, Ordering::Relaxed)
    }
}

/// The records of one node name (`NODE.SERVICE`).
#[derive(Debug, Default)]
struct NodeRecords {
    a: Vec<Record>,
    aaaa: Vec<Record>,
}

/// An SRV record (under both owner names) with the address record of its target, for the
/// additional section.
#[derive(Debug)]
struct SrvRecord {
    at_apex: Record,
    at_service: Record,
    glue: Record,
}

/// One answer: response code and the records of each section, borrowed from the zone.
#[derive(Debug)]
pub(crate) struct Answer<'z> {
    /// NOERROR, NXDOMAIN or REFUSED.
    pub(crate) code: ResponseCode,
    /// Whether we are the authority for the name (every name inside the zone).
    pub(crate) authoritative: bool,
    /// The answer section.
    pub(crate) answers: Vec<&'z Record>,
    /// The zone's SOA, for negative answers (NXDOMAIN and NOERROR with no data).
    pub(crate) soa: Option<&'z Record>,
    /// Address records of SRV targets.
    pub(crate) additionals: Vec<&'z Record>,
}

impl<'z> Answer<'z> {
    fn refused() -> Self {
        Answer {
            code: ResponseCode::Refused,
            authoritative: false,
            answers: Vec::new(),
            soa: None,
            additionals: Vec::new(),
        }
    }

    fn records(answers: Vec<&'z Record>, zone: &'z Zone) -> Self {
        // An existing name with no records of the asked type is NOERROR/NODATA; the SOA in the
        // authority section tells caches how long they may remember that.
        let soa = answers.is_empty().then_some(&zone.soa);
        Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers,
            soa,
            additionals: Vec::new(),
        }
    }

    fn nxdomain(zone: &'z Zone) -> Self {
        Answer {
            code: ResponseCode::NXDomain,
            authoritative: true,
            answers: Vec::new(),
            soa: Some(&zone.soa),
            additionals: Vec::new(),
        }
    }
}

/// Every record of the zone for one farm list.
#[derive(Debug)]
pub(crate) struct Zone {
    apex: LowerName,
    /// `_streamfarm._tcp.APEX`.
    srv_name: LowerName,
    /// `_tcp.APEX`: exists (it has a child) but has no records of its own.
    tcp_name: LowerName,
    soa: Record,
    /// A records of the UP servers, one per distinct address, in name order.
    service_a: Vec<Record>,
    /// AAAA records of the UP servers.
    service_aaaa: Vec<Record>,
    /// SRV records of the UP servers that have a usable node name.
    srv: Vec<SrvRecord>,
    /// Every named server of the list, whatever its status.
    nodes: HashMap<LowerName, NodeRecords>,
}

impl Zone {
    /// Builds the zone for `list` under `apex` (a fully qualified name) with this TTL (seconds)
    /// and SOA serial.
    pub(crate) fn build(apex: &Name, ttl: u32, serial: u32, list: &FarmList) -> Zone {
        let hostmaster = apex
            .prepend_label("hostmaster")
            .unwrap_or_else(|_| apex.clone());
        let soa = Record::from_rdata(
            apex.clone(),
            ttl,
            RData::SOA(SOA::new(
                apex.clone(),
                hostmaster,
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                ttl,
            )),
        );
        let tcp = apex
            .prepend_label(SRV_LABELS[1])
            .unwrap_or_else(|_| apex.clone());
        let srv_owner = tcp
            .prepend_label(SRV_LABELS[0])
            .unwrap_or_else(|_| apex.clone());

        // A stable base order (by name, then url) so that rotation is what moves the answers,
        // not the order in which gossip happened to deliver the entries.
        let mut servers: Vec<&ServerEntry> = list.servers.iter().collect();
        servers.sort_by(|x, y| (&x.name, &x.url).cmp(&(&y.name, &y.url)));
        let up_labels: Vec<&str> = servers
            .iter()
            .filter(|s| s.status.is_live())
            .map(|s| s.priority.as_str())
            .collect();
        let groups = group_order(up_labels.iter().copied());
        let compare_groups = group_comparator(up_labels.iter().copied());

        let mut zone = Zone {
            apex: LowerName::new(apex),
            srv_name: LowerName::new(&srv_owner),
            tcp_name: LowerName::new(&tcp),
            soa,
            service_a: Vec::new(),
            service_aaaa: Vec::new(),
            srv: Vec::new(),
            nodes: HashMap::new(),
        };

        for server in servers {
            let endpoint = url_endpoint(&server.url);
            if endpoint.is_none() {
                // Once per zone rebuild (a farm change), not per query: worth an operator's eye.
                warn!(server = %server.name, url = %server.url, "no IP address in the url; left out of DNS");
            }
            let node_name = node_name(apex, &server.name);
            if node_name.is_none() && !server.name.is_empty() {
                warn!(server = %server.name, "name is not a DNS label; no NODE.SERVICE name");
            }
            let address = endpoint.map(|(ip, _)| ip);

            if let Some(owner) = &node_name {
                let node = zone.nodes.entry(LowerName::new(owner)).or_default();
                // A DOWN node keeps its name (NODATA) but loses its address: the name then says
                // "known, not reachable" rather than pointing somewhere dead.
                if server.status != Status::Down
                    && let Some(ip) = address
                {
                    push_address(&mut node.a, &mut node.aaaa, owner, ttl, ip);
                }
            }

            if !server.status.is_live() {
                continue;
            }
            if let Some(ip) = address {
                push_address(&mut zone.service_a, &mut zone.service_aaaa, apex, ttl, ip);
            }
            if let (Some((ip, port)), Some(target)) = (endpoint, &node_name) {
                // SRV priority follows the priority group (A = 0, B = 1, ...), so a client that
                // honours SRV priorities prefers the same group that selection does.
                let priority = groups
                    .iter()
                    .position(|g| compare_groups(g, &server.priority).is_eq())
                    .unwrap_or(groups.len());
                let priority = u16::try_from(priority).unwrap_or(u16::MAX);
                let rdata = RData::SRV(SRV::new(priority, 1, port, target.clone()));
                zone.srv.push(SrvRecord {
                    at_apex: Record::from_rdata(apex.clone(), ttl, rdata.clone()),
                    at_service: Record::from_rdata(srv_owner.clone(), ttl, rdata),
                    glue: Record::from_rdata(target.clone(), ttl, address_rdata(ip)),
                });
            }
        }
        zone
    }

    /// The answer to a query for `name`/`record_type`, rotated by `rotation`.
    pub(crate) fn lookup<'z>(
        &'z self,
        name: &LowerName,
        record_type: RecordType,
        rotation: &Rotation,
    ) -> Answer<'z> {
        if !self.apex.zone_of(name) {
            return Answer::refused();
        }
        if *name == self.apex {
            let answers = match record_type {
                RecordType::A => rotated(&self.service_a, Rotation::next(&rotation.a)),
                RecordType::AAAA => rotated(&self.service_aaaa, Rotation::next(&rotation.aaaa)),
                RecordType::ANY => {
                    let mut all = rotated(&self.service_a, Rotation::next(&rotation.a));
                    all.extend(rotated(&self.service_aaaa, Rotation::next(&rotation.aaaa)));
                    all
                }
                RecordType::SOA => vec![&self.soa],
                RecordType::SRV => return self.srv_answer(rotation, false),
                _ => Vec::new(),
            };
            return Answer::records(answers, self);
        }
        if *name == self.srv_name {
            if record_type == RecordType::SRV || record_type == RecordType::ANY {
                return self.srv_answer(rotation, true);
            }
            return Answer::records(Vec::new(), self);
        }
        if *name == self.tcp_name {
            return Answer::records(Vec::new(), self);
        }
        if let Some(node) = self.nodes.get(name) {
            let answers = match record_type {
                RecordType::A => node.a.iter().collect(),
                RecordType::AAAA => node.aaaa.iter().collect(),
                RecordType::ANY => node.a.iter().chain(&node.aaaa).collect(),
                _ => Vec::new(),
            };
            return Answer::records(answers, self);
        }
        Answer::nxdomain(self)
    }

    fn srv_answer<'z>(&'z self, rotation: &Rotation, at_service: bool) -> Answer<'z> {
        let start = Rotation::next(&rotation.srv);
        let order = rotated(&self.srv, start);
        let answers = order
            .iter()
            .map(|s| {
                if at_service {
                    &s.at_service
                } else {
                    &s.at_apex
                }
            })
            .collect();
        let mut answer = Answer::records(answers, self);
        answer.additionals = order.iter().map(|s| &s.glue).collect();
        answer
    }
}

/// `items` starting at `start % len`, wrapping around.
fn rotated<T>(items: &[T], start: usize) -> Vec<&T> {
    if items.is_empty() {
        return Vec::new();
    }
    let (head, tail) = items.split_at(start % items.len());
    tail.iter().chain(head).collect()
}

/// Appends an A or AAAA record for `ip` under `owner`, unless the set already has that address
/// (several servers on one host differ only in port; an RRset must not repeat a record).
fn push_address(a: &mut Vec<Record>, aaaa: &mut Vec<Record>, owner: &Name, ttl: u32, ip: IpAddr) {
    let set = if ip.is_ipv4() { a } else { aaaa };
    let rdata = address_rdata(ip);
    if set.iter().all(|r| r.data != rdata) {
        set.push(Record::from_rdata(owner.clone(), ttl, rdata));
    }
}

/// The A or AAAA data of an address.
fn address_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// `NODE.APEX` for a server name that is one DNS label; `None` for an empty name, one with dots
/// or a wildcard, or characters a label cannot hold.
fn node_name(apex: &Name, name: &str) -> Option<Name> {
    if name.is_empty() || name.contains('.') || name == "*" {
        return None;
    }
    apex.prepend_label(name).ok()
}

/// The IP address and port of a server's url (`ws://10.0.0.1:7400/stream` → `10.0.0.1`, 7400).
///
/// Only IP literals count: a host name would need a lookup on the answer path (and could point
/// anywhere), so such servers are left out of DNS. The port defaults by scheme (80 for ws/http,
/// 443 for wss/https). Unspecified addresses (`0.0.0.0`, `::`) are not reachable and give `None`.
pub(crate) fn url_endpoint(url: &str) -> Option<(IpAddr, u16)> {
    // Userinfo (`user:pass@host`) is never ours, but is not mistaken for the host.
    let parts = split_url(url).ok()?;
    let scheme = parts.scheme?;
    let ip: IpAddr = parts.host.parse().ok()?;
    if ip.is_unspecified() {
        return None;
    }
    let port = match parts.port {
        Some(port) => port,
        None => default_port(scheme)?,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    fn entry(name: &str, url: &str, status: Status, priority: &str) -> ServerEntry {
        ServerEntry::new(name, url, status, 0, priority)
    }

    fn apex() -> Name {
        Name::from_str("farm.test.").unwrap()
    }

    fn lower(name: &str) -> LowerName {
        LowerName::new(&Name::from_str(name).unwrap())
    }

    fn three() -> FarmList {
        FarmList::new(vec![
            entry("c", "ws://127.0.0.3:7400/stream", Status::Up, "A"),
            entry("a", "ws://127.0.0.1:7400/stream", Status::Up, "A"),
            entry("b", "ws://127.0.0.2:7401/stream", Status::Up, "B"),
        ])
    }

    fn ips(answer: &Answer<'_>) -> Vec<IpAddr> {
        answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn url_endpoint_reads_ip_literals_and_default_ports() {
        assert_eq!(
            url_endpoint("ws://127.0.0.1:7400/stream"),
            Some((v4(1), 7400))
        );
        assert_eq!(
            url_endpoint("wss://[::1]:9000/s?x=1"),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 9000))
        );
        assert_eq!(url_endpoint("ws://127.0.0.2/stream"), Some((v4(2), 80)));
        assert_eq!(
            url_endpoint("wss://[::1]"),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 443))
        );
        assert_eq!(url_endpoint("ws://u:p@127.0.0.3:1/"), Some((v4(3), 1)));
        assert_eq!(url_endpoint("ws://node.example:7400/stream"), None);
        assert_eq!(url_endpoint("ws://0.0.0.0:7400/stream"), None);
        assert_eq!(url_endpoint("ws://127.0.0.1:notaport/"), None);
        assert_eq!(url_endpoint("127.0.0.1:7400"), None);
        assert_eq!(url_endpoint("gopher://127.0.0.1/"), None);
    }

    #[test]
    fn service_name_answers_every_up_server_rotated_one_place_per_answer() {
        let zone = Zone::build(&apex(), 2, 1, &three());
        let rotation = Rotation::default();
        let first = zone.lookup(&lower("farm.test."), RecordType::A, &rotation);
        assert_eq!(first.code, ResponseCode::NoError);
        assert!(first.authoritative);
        assert_eq!(ips(&first), vec![v4(1), v4(2), v4(3)]);
        assert!(first.answers.iter().all(|r| r.ttl == 2));
        let second = zone.lookup(&lower("FARM.test."), RecordType::A, &rotation);
        assert_eq!(ips(&second), vec![v4(2), v4(3), v4(1)]);
        let third = zone.lookup(&lower("farm.test."), RecordType::A, &rotation);
        assert_eq!(ips(&third), vec![v4(3), v4(1), v4(2)]);
        // AAAA lookups have their own counter: they do not push the A rotation on.
        let empty = zone.lookup(&lower("farm.test."), RecordType::AAAA, &rotation);
        assert!(empty.answers.is_empty());
        assert_eq!(empty.code, ResponseCode::NoError);
        assert!(empty.soa.is_some());
        let fourth = zone.lookup(&lower("farm.test."), RecordType::A, &rotation);
        assert_eq!(ips(&fourth), vec![v4(1), v4(2), v4(3)]);
    }

    #[test]
    fn down_and_draining_servers_are_not_in_the_service_answer() {
        let mut list = three();
        list.servers[0].status = Status::Down; // c
        list.servers[2].status = Status::Draining; // b
        let zone = Zone::build(&apex(), 2, 1, &list);
        let rotation = Rotation::default();
        for _ in 0..3 {
            let answer = zone.lookup(&lower("farm.test."), RecordType::A, &rotation);
            assert_eq!(ips(&answer), vec![v4(1)]);
        }
        let srv = zone.lookup(&lower("farm.test."), RecordType::SRV, &rotation);
        assert_eq!(srv.answers.len(), 1);
        // Node names: DRAINING still has its address, DOWN has none (but the name exists).
        let b = zone.lookup(&lower("b.farm.test."), RecordType::A, &rotation);
        assert_eq!(ips(&b), vec![v4(2)]);
        let c = zone.lookup(&lower("c.farm.test."), RecordType::A, &rotation);
        assert_eq!(c.code, ResponseCode::NoError);
        assert!(c.answers.is_empty());
    }

    #[test]
    fn no_up_server_gives_an_empty_authoritative_answer() {
        let mut list = three();
        for s in &mut list.servers {
            s.status = Status::Down;
        }
        let zone = Zone::build(&apex(), 2, 1, &list);
        let answer = zone.lookup(&lower("farm.test."), RecordType::A, &Rotation::default());
        assert_eq!(answer.code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
        assert!(answer.soa.is_some());
    }

    #[test]
    fn srv_gives_node_targets_ports_group_priorities_and_glue() {
        let zone = Zone::build(&apex(), 2, 1, &three());
        let rotation = Rotation::default();
        for owner in ["farm.test.", "_streamfarm._tcp.farm.test."] {
            let answer = zone.lookup(&lower(owner), RecordType::SRV, &rotation);
            let mut srv: Vec<(u16, u16, String)> = answer
                .answers
                .iter()
                .map(|r| {
                    assert_eq!(LowerName::new(&r.name), lower(owner));
                    match &r.data {
                        RData::SRV(s) => (s.priority, s.port, s.target.to_string()),
                        other => panic!("not SRV: {other:?}"),
                    }
                })
                .collect();
            srv.sort();
            assert_eq!(
                srv,
                vec![
                    (0, 7400, "a.farm.test.".to_string()),
                    (0, 7400, "c.farm.test.".to_string()),
                    (1, 7401, "b.farm.test.".to_string()),
                ]
            );
            assert_eq!(answer.additionals.len(), 3);
        }
    }

    #[test]
    fn node_names_answer_their_own_address() {
        let zone = Zone::build(&apex(), 2, 1, &three());
        let rotation = Rotation::default();
        let answer = zone.lookup(&lower("b.farm.test."), RecordType::A, &rotation);
        assert_eq!(ips(&answer), vec![v4(2)]);
        let mx = zone.lookup(&lower("b.farm.test."), RecordType::MX, &rotation);
        assert_eq!(mx.code, ResponseCode::NoError);
        assert!(mx.answers.is_empty());
    }

    #[test]
    fn other_names_in_the_zone_are_nxdomain_and_outside_refused() {
        let zone = Zone::build(&apex(), 2, 1, &three());
        let rotation = Rotation::default();
        let nx = zone.lookup(&lower("zz.farm.test."), RecordType::A, &rotation);
        assert_eq!(nx.code, ResponseCode::NXDomain);
        assert!(nx.soa.is_some());
        let deep = zone.lookup(&lower("x.a.farm.test."), RecordType::A, &rotation);
        assert_eq!(deep.code, ResponseCode::NXDomain);
        let tcp = zone.lookup(&lower("_tcp.farm.test."), RecordType::A, &rotation);
        assert_eq!(tcp.code, ResponseCode::NoError);
        let out = zone.lookup(&lower("example.com."), RecordType::A, &rotation);
        assert_eq!(out.code, ResponseCode::Refused);
        assert!(!out.authoritative);
        let parent = zone.lookup(&lower("test."), RecordType::A, &rotation);
        assert_eq!(parent.code, ResponseCode::Refused);
    }

    #[test]
    fn servers_sharing_an_address_give_one_a_record_and_one_srv_each() {
        let list = FarmList::new(vec![
            entry("a", "ws://127.0.0.1:7400/stream", Status::Up, "A"),
            entry("b", "ws://127.0.0.1:7401/stream", Status::Up, "A"),
            entry("", "ws://127.0.0.1:7402/stream", Status::Up, "A"),
            entry("h", "ws://host.example:7400/stream", Status::Up, "A"),
            entry("six", "ws://[::1]:7403/stream", Status::Up, "A"),
        ]);
        let zone = Zone::build(&apex(), 2, 1, &list);
        let rotation = Rotation::default();
        let a = zone.lookup(&lower("farm.test."), RecordType::A, &rotation);
        assert_eq!(ips(&a), vec![v4(1)]);
        let aaaa = zone.lookup(&lower("farm.test."), RecordType::AAAA, &rotation);
        assert_eq!(ips(&aaaa), vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        // The nameless server has no target name; the host-name server has no address.
        let srv = zone.lookup(&lower("farm.test."), RecordType::SRV, &rotation);
        assert_eq!(srv.answers.len(), 3);
        let h = zone.lookup(&lower("h.farm.test."), RecordType::A, &rotation);
        assert_eq!(h.code, ResponseCode::NoError);
        assert!(h.answers.is_empty());
    }

    #[test]
    fn zone_key_ignores_user_counts() {
        let list = three();
        let mut busier = list.clone();
        busier.servers[0].users = 500;
        assert_eq!(ZoneKey::of(&list), ZoneKey::of(&busier));
        busier.servers[0].status = Status::Draining;
        assert_ne!(ZoneKey::of(&list), ZoneKey::of(&busier));
    }
}
