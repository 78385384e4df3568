//! The farm model: one [`ServerEntry`] per server, gathered in a [`FarmList`].
//!
//! The four facts of the seeds — identity (`url`, plus a short `name`), [`Status`], connected
//! `users` and `priority` group — are required. `capacity`, `join_rate` and `users_age_ms` are
//! what we add so a client can choose well from a list that is a second or two old, and whose
//! counts are not all of the same moment. Fields this crate does not know
//! are kept in `extra`, so a list passed through one of our tools loses nothing.
//!
//! Priority groups are labels; preference is ascending (`A` before `B`), and when every label in a
//! list is an integer they compare as numbers (`1` before `2` before `10`). See [`group_order`].

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Whether a server takes new clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Serving and accepting new clients: the only live status.
    Up,
    /// Not reachable, stopped, or missed its expected status reports.
    Down,
    /// Serving its existing clients while moving them elsewhere; takes no new ones.
    Draining,
}

impl Status {
    /// The status as written in every encoding: `UP`, `DOWN` or `DRAINING`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "UP",
            Status::Down => "DOWN",
            Status::Draining => "DRAINING",
        }
    }

    /// Only an `UP` server may be chosen by a client.
    pub fn is_live(self) -> bool {
        self == Status::Up
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of `UP`, `DOWN`, `DRAINING`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}: expected UP, DOWN or DRAINING")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    /// Case-insensitive, because hand-written lists say `up` as often as `UP`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "UP" => Ok(Status::Up),
            "DOWN" => Ok(Status::Down),
            "DRAINING" => Ok(Status::Draining),
            _ => Err(UnknownStatus(s.to_string())),
        }
    }
}

/// One server of the farm as every node and client sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Short node name, unique in the farm (`a`, `node-1`). Lists in the description's text format
    /// carry no name; parsers then leave it empty.
    #[serde(default)]
    pub name: String,
    /// Where a client connects: the streaming endpoint (`ws://127.0.0.1:7400/stream`).
    pub url: String,
    /// Whether the server takes new clients.
    pub status: Status,
    /// Users connected now: open streaming connections.
    pub users: u64,
    /// Priority group label; lower groups are preferred (see [`group_order`]).
    pub priority: String,
    /// Most users the server is configured to hold, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Recent arrivals per second, when the server says: lets a client allow for the users that
    /// will have joined since its list was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_rate: Option<f64>,
    /// How long before the list's `generated_at_ms` the `users` count (and `join_rate`) was
    /// true, in milliseconds: a list server knows its own count now and its peers' only as of
    /// their last gossip, so counts of one list differ in age. Absent: as old as the list. A
    /// client compares counts of one age ([`FarmList::users_at_one_instant`]) and adds this to
    /// the list's age where the policy allows for arrivals it cannot see (`waterfill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_age_ms: Option<u64>,
    /// Fields this version does not know, kept so that nothing is lost on the way through.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ServerEntry {
    /// An entry with the four facts of the seeds and nothing else.
    pub fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        status: Status,
        users: u64,
        priority: impl Into<String>,
    ) -> Self {
        ServerEntry {
            name: name.into(),
            url: url.into(),
            status,
            users,
            priority: priority.into(),
            capacity: None,
            join_rate: None,
            users_age_ms: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// The list of all servers of a farm, as a list server hands it to a client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FarmList {
    /// Every server the list server knows of, whatever its status.
    pub servers: Vec<ServerEntry>,
    /// When the list server made this list, in milliseconds since the Unix epoch, so a client can
    /// tell how stale its view is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_at_ms: Option<u64>,
    /// Lists the list server handed out since the instant of its own count (its entry's
    /// `users_age_ms` before `generated_at_ms`), this one included: clients that may be on their
    /// way to a server and that no count shows yet. During a burst through one list server it is
    /// every client in flight, known at once, where the join rates lag by their window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// A number in `[0, 1)` that the list server gave this list alone, for the client's pick in
    /// place of a random draw of its own. The list server takes its draws from an evenly spread
    /// sequence ([`crate::selection::Draws`]), so that the clients it serves one after another
    /// split between the servers as the probabilities say, not only on average: independent
    /// draws leave each server a binomial spread, which on a small farm is most of the imbalance
    /// after a burst. `None` (a list pushed to many clients, or from elsewhere): the client draws.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draw: Option<f64>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl FarmList {
    /// A list of these servers, with no timestamp.
    pub fn new(servers: Vec<ServerEntry>) -> Self {
        FarmList {
            servers,
            generated_at_ms: None,
            in_flight: None,
            draw: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The entry with this url, if any.
    pub fn by_url(&self, url: &str) -> Option<&ServerEntry> {
        self.servers.iter().find(|s| s.url == url)
    }

    /// The same list stamped `now_ms` instead of its `generated_at_ms`: every stated count age
    /// grows by the time in between, so the counts keep saying when they were true.
    pub fn restamp(&mut self, now_ms: u64) {
        let since = self
            .generated_at_ms
            .map_or(0, |made| now_ms.saturating_sub(made));
        for server in &mut self.servers {
            if let Some(age) = &mut server.users_age_ms {
                *age = age.saturating_add(since);
            }
        }
        self.generated_at_ms = Some(now_ms);
    }

    /// The users of the servers at `indices`, each brought to the instant of the freshest count
    /// among them, and that count's age (seconds before `generated_at_ms`).
    ///
    /// Each also counts an even share of the other clients in flight (`in_flight` less this
    /// list's own client, over the servers at `indices`). On a nearly empty farm the counts alone
    /// are a few clients each, and `weighted`, which weighs `1 − users_i / total`, swings hard on a
    /// count or two of a gossip round ago, while the clients in flight, spread evenly by the list
    /// server's draws, are many. The same number added to every candidate changes no other
    /// policy: the order of the counts, and waterfill's deficits, stay as they were.
    ///
    /// A count `a` seconds older than the freshest misses the clients that server took in those
    /// seconds: about `join_rate × a` (0 without a join rate). Comparing raw counts of different
    /// ages makes the server whose count is freshest — the list server's own — look busier than
    /// its peers during a burst, and clients avoid it. The nodes already hand out counts of one
    /// instant (`docs/PROTOCOL.md`, *The farm list*), for which this changes nothing; it matters
    /// for lists from anywhere else.
    ///
    /// ```
    /// use streamfarm_core::{FarmList, ServerEntry, Status};
    /// let mut a = ServerEntry::new("a", "ws://a/s", Status::Up, 150, "A");
    /// a.users_age_ms = Some(0);
    /// let mut b = ServerEntry::new("b", "ws://b/s", Status::Up, 100, "A");
    /// (b.users_age_ms, b.join_rate) = (Some(100), Some(500.0));
    /// let (users, age) = FarmList::new(vec![a, b]).users_at_one_instant(&[0, 1]);
    /// assert_eq!((users, age), (vec![150.0, 150.0], 0.0));
    /// ```
    pub fn users_at_one_instant(&self, indices: &[usize]) -> (Vec<f64>, f64) {
        let age = |i: usize| self.servers[i].users_age_ms.unwrap_or(0) as f64 / 1000.0;
        let freshest = indices
            .iter()
            .map(|&i| age(i))
            .fold(f64::INFINITY, f64::min);
        let freshest = if freshest.is_finite() { freshest } else { 0.0 };
        // The other clients in flight through this list's server (`in_flight` counts this list
        // too), spread evenly: they are on their way, and no count shows them yet.
        let in_flight_share = match (self.in_flight, indices.len()) {
            (Some(n), k) if k > 0 => n.saturating_sub(1) as f64 / k as f64,
            _ => 0.0,
        };
        let users = indices
            .iter()
            .map(|&i| {
                let s = &self.servers[i];
                let rate = s.join_rate.filter(|r| r.is_finite() && *r > 0.0);
                s.users as f64 + rate.unwrap_or(0.0) * (age(i) - freshest) + in_flight_share
            })
            .collect();
        (users, freshest)
    }
}

/// Whether every label is an integer, so that the group order is numeric.
fn all_numeric<'a>(labels: impl IntoIterator<Item = &'a str>) -> bool {
    labels
        .into_iter()
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// Compares two all-digit labels as numbers of any length: `2` < `10`, `007` == `7`.
fn compare_numeric(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The comparison that orders priority groups among `labels`, most preferred first.
///
/// Numeric when every label is an integer, else plain string order. The choice is made for the
/// whole set so that the order is total: mixing the two rules pairwise could make `2 < 10 < 1a < 2`.
pub fn group_comparator<'a>(
    labels: impl IntoIterator<Item = &'a str>,
) -> impl Fn(&str, &str) -> Ordering {
    let numeric = all_numeric(labels);
    move |a: &str, b: &str| {
        if numeric {
            compare_numeric(a, b)
        } else {
            a.cmp(b)
        }
    }
}

/// The distinct group labels of `labels`, most preferred first.
///
/// ```
/// use streamfarm_core::model::group_order;
/// assert_eq!(group_order(["B", "A", "B"]), vec!["A", "B"]);
/// assert_eq!(group_order(["10", "2", "1"]), vec!["1", "2", "10"]);
/// ```
pub fn group_order<'a>(labels: impl IntoIterator<Item = &'a str> + Clone) -> Vec<&'a str> {
    let compare = group_comparator(labels.clone());
    let mut groups: Vec<&str> = labels.into_iter().collect();
    groups.sort_by(|a, b| compare(a, b));
    groups.dedup_by(|a, b| compare(a, b) == Ordering::Equal);
    groups
}

/// The tests' farm: `UP` servers `s0`, `s1`, … (url `ws://sN/`) in group `A` with these users.
#[cfg(test)]
pub(crate) fn test_farm(users: &[u64]) -> FarmList {
    FarmList::new(
        users
            .iter()
            .enumerate()
            .map(|(i, &u)| {
                ServerEntry::new(format!("s{i}"), format!("ws://s{i}/"), Status::Up, u, "A")
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses_any_case_and_renders_upper() {
        assert_eq!("up".parse::<Status>().unwrap(), Status::Up);
        assert_eq!("Draining".parse::<Status>().unwrap(), Status::Draining);
        assert_eq!(Status::Down.to_string(), "DOWN");
        assert!("SIDEWAYS".parse::<Status>().is_err());
    }

    #[test]
    fn letter_groups_order_alphabetically() {
        assert_eq!(group_order(["B", "C", "A"]), vec!["A", "B", "C"]);
    }

    #[test]
    fn integer_groups_order_numerically_with_leading_zeros_equal() {
        assert_eq!(group_order(["10", "2", "02", "1"]), vec!["1", "2", "10"]);
    }

    #[test]
    fn mixed_labels_fall_back_to_string_order() {
        assert_eq!(group_order(["2", "10", "x"]), vec!["10", "2", "x"]);
    }

    #[test]
    fn restamping_ages_the_counts() {
        let mut list = test_farm(&[1, 2]);
        list.servers[0].users_age_ms = Some(40);
        list.generated_at_ms = Some(1_000);
        list.restamp(1_025);
        assert_eq!(list.generated_at_ms, Some(1_025));
        assert_eq!(list.servers[0].users_age_ms, Some(65));
        assert_eq!(list.servers[1].users_age_ms, None);
    }

    #[test]
    fn json_keeps_unknown_fields() {
        let text = r#"{"servers":[{"name":"a","url":"ws://a/s","status":"UP","users":1,"priority":"A","zone":"eu"}],"farm":"f1"}"#;
        let list: FarmList = serde_json::from_str(text).unwrap();
        assert_eq!(list.servers[0].extra["zone"], "eu");
        assert_eq!(list.extra["farm"], "f1");
        let again: FarmList = serde_json::from_str(&serde_json::to_string(&list).unwrap()).unwrap();
        assert_eq!(again, list);
    }
}
