//! The NATS relay's pure parts: subject tokens, the `relay` setting, the replay window.

use super::*;

#[test]
fn tokens_keep_subjects_intact_and_differ_for_different_text() {
    assert_eq!(token("scores-1_a"), "scores-1_a");
    assert_eq!(token("a.b"), "a~2Eb");
    assert_eq!(token("a.*.>"), "a~2E~2A~2E~3E");
    assert_eq!(token("~"), "~7E");
    assert_eq!(token(""), "~");
    assert_eq!(token("é"), "~C3~A9");
    for text in ["a b", "x\ty", "a.b", "*", ">", "ü.~"] {
        let t = token(text);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_~".contains(&b)),
            "{text:?} → {t:?}"
        );
    }
    // Injective: `~` is escaped too, so no two texts share a token.
    assert_ne!(token("~2E"), token("."));
}

#[test]
fn the_relay_setting_is_parsed_or_refused_with_the_setting_named() {
    let s =
        NatsSettings::parse("nats://u:p@127.0.0.1:4222, tls://n2:4223", None, "farm a").unwrap();
    assert_eq!(s.servers.len(), 2);
    assert_eq!(s.credentials, Some(("u".into(), Some("p".into()))));
    assert_eq!(s.prefix, "streamfarm.farm~20a");
    assert!(!format!("{s:?}").contains(":p@"), "{s:?}");
    let s = NatsSettings::parse("nats://tok@h:1", Some("apps.push"), "x").unwrap();
    assert_eq!(s.credentials, Some(("tok".into(), None)));
    assert_eq!(s.prefix, "apps.push");
    for (relay, prefix, field) in [
        ("embeded", None, "relay"),
        ("http://h:4222", None, "relay"),
        ("nats://", None, "relay"),
        ("nats://a:b@h:1,nats://c:d@h:2", None, "relay"),
        ("nats://h:99999", None, "relay"),
        ("nats://h:1", Some("a..b"), "relay_subject_prefix"),
        ("nats://h:1", Some("a.*"), "relay_subject_prefix"),
        ("nats://h:1", Some("a b"), "relay_subject_prefix"),
    ] {
        let err = NatsSettings::parse(relay, prefix, "c").unwrap_err();
        assert_eq!(err.0, field, "{relay} {prefix:?}: {}", err.1);
        assert!(!err.1.contains(":b@"), "no password in errors: {}", err.1);
    }
}

#[test]
fn the_replay_window_takes_each_frame_once_and_no_older_incarnation() {
    let mut w = Window::new(5);
    assert!(w.accept(5, 1));
    assert!(!w.accept(5, 1), "a replay");
    assert!(w.accept(5, 3));
    assert!(w.accept(5, 2), "out of order, not seen yet");
    assert!(!w.accept(5, 2));
    assert!(w.accept(5, 2000));
    assert!(!w.accept(5, 3), "far below the window");
    assert!(w.accept(5, 1990));
    assert!(!w.accept(4, 2001), "an older incarnation");
    assert!(w.accept(6, 1), "a newer incarnation starts over");
    assert!(!w.accept(5, 2001));
    assert!(!w.accept(6, 0));
}
