//! The topics a client subscribes to and where it stands in each: the part of the failover
//! machine that makes a failover lose nothing.
//!
//! For every topic, [`Topics`] holds the position of the last message the application was given.
//! On every (re)subscription the client sends those positions; the node answers `subscribed`
//! with each topic's current position and sends what was missed before any live message.
//! [`Topics`] then:
//! - drops a message at or before the held position of the same epoch (a duplicate: a message
//!   that reached the client on its old server and is sent again from history);
//! - counts the messages up to the position `subscribed` named, and reports
//!   [`TopicNotice::Recovered`] once they are all in (a count of 0 says plainly that nothing was
//!   missed);
//! - reports every `gap` frame as [`TopicNotice::Gap`] with its exact range, and a jump in
//!   offsets that no `gap` announced (which a node never sends) the same way, so nothing is
//!   ever lost silently.
//!
//! Pure: no I/O, no clock.
//!
//! ```
//! use streamfarm_client::topics::{Topics, TopicNotice};
//! use streamfarm_core::protocol::{Epoch, Position};
//! let mut topics = Topics::default();
//! topics.subscribe(["prices".to_string()]);
//! let at = |offset| Some(Position::new(Epoch(1), offset));
//! assert!(topics.on_message("prices", at(1)).deliver);
//! assert!(!topics.on_message("prices", at(1)).deliver); // a duplicate
//! // After a failover: subscribed again with position 1; the node is at 3.
//! let now = std::collections::BTreeMap::from([("prices".to_string(), Position::new(Epoch(1), 3))]);
//! assert!(topics.on_subscribed(&now).is_empty());
//! assert!(topics.on_message("prices", at(2)).deliver);
//! let done = topics.on_message("prices", at(3));
//! assert_eq!(done.notice, Some(TopicNotice::Recovered { topic: "prices".into(), count: 2 }));
//! ```

use std::collections::BTreeMap;

use streamfarm_core::protocol::{Epoch, GapReason, Position};

/// What a client's position-keeping tells the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicNotice {
    /// After a resubscription, every message missed on `topic` was received: `count` of them.
    Recovered {
        /// The topic.
        topic: String,
        /// Messages received from history (0: nothing was missed).
        count: u64,
    },
    /// Messages of `topic` that will never arrive: offsets `from..=to` of `epoch` (`to` absent:
    /// the rest of that epoch).
    Gap {
        /// The topic.
        topic: String,
        /// The epoch of the missing messages.
        epoch: Epoch,
        /// First missing offset.
        from: u64,
        /// Last missing offset, when known.
        to: Option<u64>,
        /// Why (`history_exceeded`, `epoch_lost`, `unavailable`, or `unannounced` for a jump in
        /// offsets that no `gap` frame explained).
        reason: String,
    },
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Give it to the application (false: a duplicate).
    pub deliver: bool,
    /// Something to tell the application besides.
    pub notice: Option<TopicNotice>,
}

/// Where the client stands in one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Standing {
    /// The last message given to the application.
    held: Option<Position>,
    /// Resubscribed with `held`: counting the missed messages until this position arrives.
    recovering: Option<(Position, u64)>,
}

/// See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    topics: BTreeMap<String, Standing>,
}

impl Topics {
    /// Adds topics; returns those that were new.
    pub fn subscribe(&mut self, topics: impl IntoIterator<Item = String>) -> Vec<String> {
        topics
            .into_iter()
            .filter(|topic| {
                let new = !self.topics.contains_key(topic);
                if new {
                    self.topics.insert(topic.clone(), Standing::default());
                }
                new
            })
            .collect()
    }

    /// Removes topics; returns those that were subscribed.
    pub fn unsubscribe(&mut self, topics: impl IntoIterator<Item = String>) -> Vec<String> {
        topics
            .into_iter()
            .filter(|topic| self.topics.remove(topic).is_some())
            .collect()
    }

    /// Every subscribed topic.
    pub fn names(&self) -> Vec<String> {
        self.topics.keys().cloned().collect()
    }

    /// Whether no topic is subscribed.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Whether `topic` is subscribed.
    pub fn contains(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// The position held for each topic that has one: what a `sub` frame carries.
    pub fn positions(&self) -> BTreeMap<String, Position> {
        self.topics
            .iter()
            .filter_map(|(topic, s)| s.held.map(|p| (topic.clone(), p)))
            .collect()
    }

    /// The position held for `topic`.
    pub fn position(&self, topic: &str) -> Option<Position> {
        self.topics.get(topic).and_then(|s| s.held)
    }

    /// The connection broke: recoveries in progress start over on the next server.
    pub fn on_lost(&mut self) {
        for standing in self.topics.values_mut() {
            standing.recovering = None;
        }
    }

    /// A `subscribed` frame arrived with each topic's current position: topics resumed from a
    /// held position count what they receive up to it; a topic without one holds the current
    /// position from now on (everything before it was before the subscription), so a failover
    /// before its first message still resumes exactly. Returns the topics that missed nothing.
    pub fn on_subscribed(&mut self, current: &BTreeMap<String, Position>) -> Vec<TopicNotice> {
        let mut notices = Vec::new();
        for (topic, now) in current {
            let Some(standing) = self.topics.get_mut(topic) else {
                continue;
            };
            let Some(held) = standing.held else {
                standing.held = Some(*now);
                continue;
            };
            if held.epoch == now.epoch && held.offset >= now.offset {
                notices.push(TopicNotice::Recovered {
                    topic: topic.clone(),
                    count: 0,
                });
            } else {
                standing.recovering = Some((*now, 0));
            }
        }
        notices
    }

    /// A message arrived on `topic` at `position` (none from a node without positions).
    pub fn on_message(&mut self, topic: &str, position: Option<Position>) -> Verdict {
        let deliver = Verdict {
            deliver: true,
            notice: None,
        };
        let (Some(standing), Some(position)) = (self.topics.get_mut(topic), position) else {
            return deliver;
        };
        let mut notice = None;
        if let Some(held) = standing.held {
            if held.epoch == position.epoch {
                if position.offset <= held.offset {
                    return Verdict {
                        deliver: false,
                        notice: None,
                    };
                }
                if position.offset > held.offset + 1 {
                    notice = Some(TopicNotice::Gap {
                        topic: topic.to_string(),
                        epoch: held.epoch,
                        from: held.offset + 1,
                        to: Some(position.offset - 1),
                        reason: "unannounced".to_string(),
                    });
                }
            } else {
                notice = Some(TopicNotice::Gap {
                    topic: topic.to_string(),
                    epoch: held.epoch,
                    from: held.offset + 1,
                    to: None,
                    reason: "unannounced".to_string(),
                });
            }
        }
        standing.held = Some(position);
        if let Some((target, count)) = &mut standing.recovering
            && target.epoch == position.epoch
            && position.offset <= target.offset
        {
            *count += 1;
            if position.offset == target.offset {
                let count = *count;
                standing.recovering = None;
                // A jump already reported wins; the recovery is reported with the next message.
                notice = notice.or(Some(TopicNotice::Recovered {
                    topic: topic.to_string(),
                    count,
                }));
            }
        }
        Verdict {
            deliver: true,
            notice,
        }
    }

    /// A `gap` frame arrived: the client moves past it, and reports it.
    pub fn on_gap(
        &mut self,
        topic: &str,
        epoch: Epoch,
        from: u64,
        to: Option<u64>,
        reason: GapReason,
    ) -> Vec<TopicNotice> {
        let mut notices = vec![TopicNotice::Gap {
            topic: topic.to_string(),
            epoch,
            from,
            to,
            reason: reason.as_str().to_string(),
        }];
        let Some(standing) = self.topics.get_mut(topic) else {
            return notices;
        };
        match (standing.held, to) {
            // The rest of the held epoch is gone: whatever epoch comes next is taken as it is.
            (Some(held), None) if held.epoch == epoch => standing.held = None,
            (Some(held), Some(to)) if held.epoch == epoch && to > held.offset => {
                standing.held = Some(Position::new(epoch, to));
            }
            (None, Some(to)) => standing.held = Some(Position::new(epoch, to)),
            _ => {}
        }
        if let (Some(held), Some((target, count))) = (standing.held, standing.recovering)
            && held == target
        {
            standing.recovering = None;
            notices.push(TopicNotice::Recovered {
                topic: topic.to_string(),
                count,
            });
        }
        notices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: Epoch = Epoch(5);

    fn at(offset: u64) -> Option<Position> {
        Some(Position::new(E, offset))
    }

    fn topics() -> Topics {
        let mut topics = Topics::default();
        assert_eq!(topics.subscribe(["t".to_string()]), vec!["t".to_string()]);
        assert!(topics.subscribe(["t".to_string()]).is_empty());
        topics
    }

    #[test]
    fn a_first_subscription_holds_the_current_position() {
        let mut topics = topics();
        let current = BTreeMap::from([("t".to_string(), Position::new(E, 41))]);
        assert!(topics.on_subscribed(&current).is_empty());
        assert_eq!(topics.position("t"), at(41));
        // A failover before any message: resumed from 41, nothing missed is said plainly.
        topics.on_lost();
        assert_eq!(
            topics.on_subscribed(&current),
            vec![TopicNotice::Recovered {
                topic: "t".into(),
                count: 0
            }]
        );
    }

    #[test]
    fn duplicates_are_dropped_by_offset() {
        let mut topics = topics();
        assert!(topics.on_message("t", at(1)).deliver);
        assert!(topics.on_message("t", at(2)).deliver);
        assert!(!topics.on_message("t", at(2)).deliver);
        assert!(!topics.on_message("t", at(1)).deliver);
        assert_eq!(topics.position("t"), at(2));
        // Messages without positions and of unknown topics are passed on.
        assert!(topics.on_message("t", None).deliver);
        assert!(topics.on_message("other", at(1)).deliver);
    }

    #[test]
    fn a_resumed_topic_reports_what_it_recovered() {
        let mut topics = topics();
        topics.on_message("t", at(4));
        topics.on_lost();
        let current = BTreeMap::from([("t".to_string(), Position::new(E, 7))]);
        assert!(topics.on_subscribed(&current).is_empty());
        assert!(!topics.on_message("t", at(4)).deliver, "already held");
        for offset in 5..7 {
            assert_eq!(topics.on_message("t", at(offset)).notice, None);
        }
        assert_eq!(
            topics.on_message("t", at(7)).notice,
            Some(TopicNotice::Recovered {
                topic: "t".into(),
                count: 3
            })
        );
        assert_eq!(topics.on_message("t", at(8)).notice, None);
        // Nothing missed: said at once.
        let current = BTreeMap::from([("t".to_string(), Position::new(E, 8))]);
        assert_eq!(
            topics.on_subscribed(&current),
            vec![TopicNotice::Recovered {
                topic: "t".into(),
                count: 0
            }]
        );
    }

    #[test]
    fn gaps_are_reported_and_skipped() {
        let mut topics = topics();
        topics.on_message("t", at(2));
        let current = BTreeMap::from([("t".to_string(), Position::new(E, 9))]);
        topics.on_subscribed(&current);
        let notices = topics.on_gap("t", E, 3, Some(7), GapReason::HistoryExceeded);
        assert_eq!(
            notices,
            vec![TopicNotice::Gap {
                topic: "t".into(),
                epoch: E,
                from: 3,
                to: Some(7),
                reason: "history_exceeded".into()
            }]
        );
        assert_eq!(topics.on_message("t", at(8)).notice, None);
        assert!(matches!(
            topics.on_message("t", at(9)).notice,
            Some(TopicNotice::Recovered { count: 2, .. })
        ));
        // An epoch lost: the next epoch is taken from its first message.
        topics.on_gap("t", E, 10, None, GapReason::EpochLost);
        let next = Some(Position::new(Epoch(6), 1));
        assert_eq!(topics.on_message("t", next).notice, None);
        assert_eq!(topics.position("t"), next);
    }

    #[test]
    fn a_jump_no_gap_announced_is_reported_not_hidden() {
        let mut topics = topics();
        topics.on_message("t", at(1));
        let verdict = topics.on_message("t", at(4));
        assert!(verdict.deliver);
        assert_eq!(
            verdict.notice,
            Some(TopicNotice::Gap {
                topic: "t".into(),
                epoch: E,
                from: 2,
                to: Some(3),
                reason: "unannounced".into()
            })
        );
    }
}
