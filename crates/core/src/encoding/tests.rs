//! Encoding tests: the description's example, error messages, round-trips and never-panic
//! properties over arbitrary lists and arbitrary input.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::*;
use crate::model::{ServerEntry, Status};

const EXAMPLE_TEXT: &str = "http://serverA.caplin.com UP 2963 A\n\
                            http://serverB.caplin.com DOWN 0 B\n\
                            http://serverN.caplin.com UP 2979 A\n";

fn example() -> FarmList {
    FarmList::new(vec![
        ServerEntry::new("", "http://serverA.caplin.com", Status::Up, 2963, "A"),
        ServerEntry::new("", "http://serverB.caplin.com", Status::Down, 0, "B"),
        ServerEntry::new("", "http://serverN.caplin.com", Status::Up, 2979, "A"),
    ])
}

/// A list using every field, with awkward strings everywhere.
fn full() -> FarmList {
    let mut a = ServerEntry::new(
        "a <&> \"q\" 'x' = # %",
        "ws://127.0.0.1:7400/stream?x=1&y=%20#frag",
        Status::Up,
        12,
        "A",
    );
    a.capacity = Some(10_000);
    a.join_rate = Some(2.5);
    a.users_age_ms = Some(150);
    a.extra.insert("zone".into(), Value::from("eu west"));
    a.extra.insert("weight".into(), Value::from(3));
    a.extra.insert("looks_numeric".into(), Value::from("12"));
    a.extra
        .insert("tags".into(), serde_json::json!(["x", {"y": null}]));
    a.extra.insert("empty".into(), Value::from(""));
    a.extra.insert("odd key=\n".into(), Value::from(true));
    let b = ServerEntry::new("b\tc\u{2028}", "ws://b/s", Status::Draining, 0, "10");
    let mut list = FarmList::new(vec![a, b]);
    list.generated_at_ms = Some(1_700_000_000_123);
    list.in_flight = Some(42);
    list.draw = Some(0.618_033_988_749_894_8);
    list.extra.insert("farm".into(), Value::from("f1"));
    list
}

#[test]
fn example_text_parses_to_the_four_facts_and_renders_back_exactly() {
    let list = parse(EXAMPLE_TEXT, Format::Text).unwrap();
    assert_eq!(list, example());
    assert_eq!(render(&list, Format::Text), EXAMPLE_TEXT);
}

#[test]
fn text_allows_comments_blank_lines_and_any_whitespace() {
    let input =
        "# the farm\n\n  http://a  up\t5 A   # trailing comment\r\n\t\n#@ generated_at_ms=7\n";
    let list = parse(input, Format::Text).unwrap();
    assert_eq!(
        list.servers,
        vec![ServerEntry::new("", "http://a", Status::Up, 5, "A")]
    );
    assert_eq!(list.generated_at_ms, Some(7));
}

#[test]
fn text_optional_fields_are_read() {
    let list = parse(
        "ws://a/s UP 1 A name=a capacity=100 join_rate=0.5 users_age_ms=120 zone=eu",
        Format::Text,
    )
    .unwrap();
    let s = &list.servers[0];
    assert_eq!(
        (s.name.as_str(), s.capacity, s.join_rate, s.users_age_ms),
        ("a", Some(100), Some(0.5), Some(120))
    );
    assert_eq!(s.extra["zone"], "eu");
}

#[test]
fn every_format_round_trips_the_full_list() {
    for format in Format::ALL {
        let text = render(&full(), format);
        assert_eq!(parse(&text, format).unwrap(), full(), "{format}:\n{text}");
        assert_eq!(detect(&text), format, "{text}");
        assert_eq!(parse_detected(&text).unwrap(), full());
    }
}

#[test]
fn text_error_names_line_field_expected_and_found() {
    let err = parse("ws://a UP 1 A\n\nws://b UP x A\n", Format::Text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "text list, line 3, field USERS: expected a non-negative integer, found \"x\""
    );
    let err = parse("ws://a SIDEWAYS 1 A", Format::Text).unwrap_err();
    assert_eq!((err.line, err.field.as_deref()), (Some(1), Some("STATUS")));
    let err = parse("ws://a UP 1", Format::Text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "text list, line 1, field PRIORITY: expected a priority group label, found the end of the line"
    );
    let err = parse("ws://a UP 1 A capacity=-3", Format::Text).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("capacity"));
    let err = parse("ws://a UP 1 A users=3", Format::Text).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("users"));
    let err = parse("ws://a UP 1 A name=%ZZ", Format::Text).unwrap_err();
    assert!(err.to_string().contains("percent-encoded"), "{err}");
    let err = parse("ws://a UP 1 A stray", Format::Text).unwrap_err();
    assert!(err.to_string().contains("key=value"), "{err}");
}

#[test]
fn json_error_has_line_and_column() {
    let err = parse(
        "{\"servers\":[\n{\"url\":\"u\",\"status\":\"UP\",\"users\":\"x\",\"priority\":\"A\"}]}",
        Format::Json,
    )
    .unwrap_err();
    assert_eq!(err.format, Format::Json);
    assert_eq!(err.line, Some(2));
    assert!(
        err.to_string().starts_with("json list, line 2, column "),
        "{err}"
    );
    let err = parse(
        "{\"servers\":[{\"url\":\"u\",\"status\":\"UP\",\"users\":1}]}",
        Format::Json,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("priority"), "{err}");
    let err = parse(
        "{\"servers\":[{\"url\":\"u\",\"status\":\"SIDEWAYS\",\"users\":1,\"priority\":\"A\"}]}",
        Format::Json,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("status"), "{err}");
}

#[test]
fn xml_reads_the_documented_shape_and_names_bad_fields() {
    let xml = r#"<?xml version="1.0"?>
<!-- a farm -->
<farm>
  <server name="a" url="ws://a/s" status="UP" users="12" priority="A"/>
  <server url="ws://b/s" status="DOWN" users="0" priority="B" zone="eu"><unknown/></server>
</farm>"#;
    let list = parse(xml, Format::Xml).unwrap();
    assert_eq!(
        list.servers[0],
        ServerEntry::new("a", "ws://a/s", Status::Up, 12, "A")
    );
    assert_eq!(list.servers[1].extra["zone"], "eu");
    assert_eq!(parse("<farm/>", Format::Xml).unwrap(), FarmList::default());

    let bad = "<farm>\n<server url=\"u\" status=\"UP\" users=\"many\" priority=\"A\"/>\n</farm>";
    let err = parse(bad, Format::Xml).unwrap_err();
    assert_eq!(
        err.to_string(),
        "xml list, line 2, field users: expected a non-negative integer, found \"many\""
    );
    let err = parse(
        "<farm>\n<server url=\"u\" status=\"UP\" users=\"1\"/>",
        Format::Xml,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("priority"));
    assert!(parse("<list/>", Format::Xml).is_err());
    assert!(parse("<farm>", Format::Xml).is_err());
    assert!(parse("", Format::Xml).is_err());
    let dup = "<farm><server url=\"u\" status=\"UP\" users=\"1\" priority=\"A\"><extra key=\"url\" value=\"v\"/></server></farm>";
    assert!(parse(dup, Format::Xml).is_err());
}

#[test]
fn js_calls_the_callback_and_refuses_unsafe_names() {
    let list = example();
    let js = render(&list, Format::Js);
    assert!(js.starts_with("streamfarmFarm({\"servers\":["), "{js}");
    assert!(js.ends_with(");\n"));
    assert_eq!(parse(&js, Format::Js).unwrap(), list);
    let custom = render_js(&list, "window.app.$onFarm_2").unwrap();
    assert_eq!(parse(&custom, Format::Js).unwrap(), list);
    for bad in [
        "",
        "a b",
        "alert(1);x",
        "a..b",
        "1a",
        "a.",
        "x</script>",
        "é",
    ] {
        let err = render_js(&list, bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("callback"), "{bad:?}");
    }
    let mut tricky = FarmList::new(vec![ServerEntry::new(
        "</script>\u{2028}",
        "u",
        Status::Up,
        1,
        "A",
    )]);
    tricky.servers[0].priority = "<".into();
    let js = render(&tricky, Format::Js);
    assert!(!js.contains('<') && !js.contains('\u{2028}'), "{js}");
    assert_eq!(parse(&js, Format::Js).unwrap(), tricky);
    let err = parse("f(\n{\"servers\":[}\n);", Format::Js).unwrap_err();
    assert_eq!((err.format, err.line), (Format::Js, Some(2)), "{err}");
}

#[test]
fn detect_tells_the_formats_apart() {
    assert_eq!(detect(" {\"servers\":[]}"), Format::Json);
    assert_eq!(detect("\u{feff}<farm/>"), Format::Xml);
    assert_eq!(detect("cb({\"servers\":[]})"), Format::Js);
    assert_eq!(detect("http://a UP 1 A"), Format::Text);
    assert_eq!(detect("# comment\nhttp://a UP 1 A"), Format::Text);
    assert_eq!(detect(""), Format::Text);
}

#[test]
fn format_names_and_content_types() {
    for format in Format::ALL {
        assert_eq!(Format::from_name(format.name()), Some(format));
        assert_eq!(
            Format::from_name(&format.name().to_uppercase()),
            Some(format)
        );
    }
    assert_eq!(Format::from_name("yaml"), None);
    assert_eq!(Format::Text.content_type(), "text/plain; charset=utf-8");
    assert_eq!(Format::Js.content_type(), "application/javascript");
}

#[test]
fn accept_negotiation() {
    let cases = [
        ("", Some(Format::Json)),
        ("*/*", Some(Format::Json)),
        ("application/json", Some(Format::Json)),
        ("TEXT/PLAIN", Some(Format::Text)),
        ("text/xml", Some(Format::Xml)),
        ("text/javascript", Some(Format::Js)),
        ("application/javascript; charset=utf-8", Some(Format::Js)),
        ("text/*", Some(Format::Text)),
        ("text/*;q=0.5, application/xml", Some(Format::Xml)),
        (
            "application/json;q=0.2, text/plain;q=0.8",
            Some(Format::Text),
        ),
        ("text/plain, application/json", Some(Format::Text)),
        ("application/json, text/plain", Some(Format::Json)),
        ("application/json;q=0, */*;q=0.1", Some(Format::Text)),
        (
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            Some(Format::Xml),
        ),
        ("image/png", None),
        ("*/*;q=0", None),
        ("application/json;q=abc", None),
    ];
    for (accept, expected) in cases {
        assert_eq!(Format::from_accept(accept), expected, "{accept:?}");
    }
}

// ---- properties ----

/// Strings any format can hold: no control characters (XML cannot hold U+0000; the others can,
/// see `text_names_with_control_characters_round_trip`).
fn any_text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

/// What the text format's positional fields can hold: non-empty, no whitespace, no controls,
/// not starting with `#` or a byte-order mark.
fn token() -> impl Strategy<Value = String> {
    "[^\\s\\p{Cc}#\u{feff}][^\\s\\p{Cc}]{0,15}"
}

fn extra_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any_text().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
        (-1e12f64..1e12).prop_map(Value::from),
        prop::collection::vec(any_text().prop_map(Value::from), 0..3).prop_map(Value::from),
    ]
}

fn extras(known: &'static [&'static str]) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(
        any_text().prop_filter("known field", move |k| !known.contains(&k.as_str())),
        extra_value(),
        0..3,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![Just(Status::Up), Just(Status::Down), Just(Status::Draining)]
}

fn server() -> impl Strategy<Value = ServerEntry> {
    (
        any_text(),
        token(),
        status(),
        any::<u64>(),
        token(),
        prop::option::of(any::<u64>()),
        prop::option::of(prop_oneof![0.0f64..1e9, Just(0.0), Just(f64::MAX)]),
        prop::option::of(any::<u64>()),
        extras(SERVER_FIELDS),
    )
        .prop_map(
            |(name, url, status, users, priority, capacity, join_rate, users_age_ms, extra)| {
                ServerEntry {
                    name,
                    url,
                    status,
                    users,
                    priority,
                    capacity,
                    join_rate,
                    users_age_ms,
                    extra,
                }
            },
        )
}

fn farm_list() -> impl Strategy<Value = FarmList> {
    (
        prop::collection::vec(server(), 0..6),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u64>()),
        prop::option::of(0.0..1.0f64),
        extras(LIST_FIELDS),
    )
        .prop_map(
            |(servers, generated_at_ms, in_flight, draw, extra)| FarmList {
                servers,
                generated_at_ms,
                in_flight,
                draw,
                extra,
            },
        )
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![
        Just(Format::Json),
        Just(Format::Text),
        Just(Format::Xml),
        Just(Format::Js)
    ]
}

proptest! {
    #[test]
    fn render_then_parse_gives_the_list_back(list in farm_list(), format in format()) {
        let text = render(&list, format);
        prop_assert_eq!(parse(&text, format).unwrap(), list.clone(), "{}", text);
        // A text list is recognised by its urls; made-up "urls" like `<x` or `f(` are not.
        let urls_look_like_urls = list.servers.first().is_none_or(|s| s.url.contains("://") && !s.url.starts_with(['<', '{', '[']));
        if format != Format::Text || urls_look_like_urls {
            prop_assert_eq!(detect(&text), format);
        }
    }

    #[test]
    fn text_names_with_control_characters_round_trip(name in ".{0,12}", value in ".{0,12}") {
        let mut list = example();
        list.servers[0].name = name;
        list.servers[0].extra.insert("k".into(), Value::from(value));
        prop_assert_eq!(parse(&render(&list, Format::Text), Format::Text).unwrap(), list);
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_input(input in ".{0,200}", format in format()) {
        let _ = parse(&input, format);
        let _ = parse_detected(&input);
    }

    #[test]
    fn parsers_never_panic_on_mutated_lists(
        list in farm_list(),
        format in format(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), "\\PC{0,3}"), 1..4),
    ) {
        let mut text = render(&list, format);
        for (at, len, insert) in cuts {
            // Cut out a span and splice in a few characters, on char boundaries.
            let chars: Vec<char> = text.chars().collect();
            let start = at.index(chars.len() + 1);
            let end = (start + len.index(8)).min(chars.len());
            text = chars[..start].iter().chain(insert.chars().collect::<Vec<_>>().iter()).chain(chars[end..].iter()).collect();
        }
        if let Err(err) = parse(&text, format) {
            // Every error must still display.
            prop_assert!(!err.to_string().is_empty());
        }
    }
}
