//! Plain text: the description's own format, one server per line.
//!
//! ```text
//! # comments and blank lines are ignored
//! http://serverA.caplin.com UP 2963 A
//! http://serverB.caplin.com DOWN 0 B
//! ws://10.0.0.3:7400/stream UP 12 A name=c capacity=10000 join_rate=2.5 users_age_ms=150
//! ```
//!
//! Each line is `URL STATUS USERS PRIORITY`, separated by whitespace, then optionally `key=value`
//! fields for what the four facts of the seeds do not cover: `name`, `capacity`, `join_rate`,
//! `users_age_ms`, and any unknown field (kept in `extra`, its value read as in [`crate::encoding`]). A token starting
//! with `#` after the four fields starts a trailing comment. The renderer writes the optional
//! fields only when present, so a list with just the four facts renders exactly as the
//! description shows it, and the name is then empty (the description's lists carry no names).
//!
//! A line starting with `#@` holds fields of the list itself, as `key=value`:
//! `#@ generated_at_ms=1700000000000 farm=eu`. Other readers see a comment.
//!
//! What the text can hold:
//! - `key=value` keys and values are percent-encoded (`%20` for a space; whitespace, control
//!   characters, `%`, `=` and `#` are encoded), so any name and any value survives.
//! - URL, STATUS, USERS and PRIORITY are verbatim, as in the description: the URL's own `%XX`
//!   escapes are left alone. So a url or priority cannot be empty or hold whitespace or control
//!   characters, and a url cannot start with `#` (or U+FEFF). The renderer writes such characters as `%XX` (the
//!   URL's own escape for them) and an empty field as `-`: those entries do not round-trip. Servers
//!   never have such urls or labels.

use std::collections::HashSet;
use std::fmt::Write as _;

use serde_json::Map;

use super::{Format, ParseError, extra_to_plain, field, plain_to_extra, quoted};
use crate::model::{FarmList, ServerEntry};

/// Fields a `key=value` may not name: they are positional (or, for the list, the server lines).
const POSITIONAL: [&str; 4] = ["url", "status", "users", "priority"];

/// Writes `list` in the text format.
pub fn render(list: &FarmList) -> String {
    let mut out = String::new();
    if list.generated_at_ms.is_some()
        || list.in_flight.is_some()
        || list.draw.is_some()
        || !list.extra.is_empty()
    {
        out.push_str("#@");
        if let Some(at) = list.generated_at_ms {
            let _ = write!(out, " generated_at_ms={at}");
        }
        if let Some(n) = list.in_flight {
            let _ = write!(out, " in_flight={n}");
        }
        if let Some(d) = list.draw {
            let _ = write!(out, " draw={d}");
        }
        for (key, value) in &list.extra {
            let _ = write!(out, " {}={}", encode(key), encode(&extra_to_plain(value)));
        }
        out.push('\n');
    }
    for s in &list.servers {
        let _ = write!(
            out,
            "{} {} {} {}",
            verbatim(&s.url, true),
            s.status,
            s.users,
            verbatim(&s.priority, false)
        );
        if !s.name.is_empty() {
            let _ = write!(out, " name={}", encode(&s.name));
        }
        if let Some(capacity) = s.capacity {
            let _ = write!(out, " capacity={capacity}");
        }
        if let Some(rate) = s.join_rate {
            let _ = write!(out, " join_rate={rate}");
        }
        if let Some(age) = s.users_age_ms {
            let _ = write!(out, " users_age_ms={age}");
        }
        for (key, value) in &s.extra {
            let _ = write!(out, " {}={}", encode(key), encode(&extra_to_plain(value)));
        }
        out.push('\n');
    }
    out
}

/// Reads a list in the text format.
pub fn parse(input: &str) -> Result<FarmList, ParseError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let mut list = FarmList::default();
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if let Some(attributes) = line.strip_prefix("#@") {
            parse_list_fields(attributes, &mut list).map_err(|e| e.at_line(number))?;
        } else if !line.is_empty() && !line.starts_with('#') {
            list.servers
                .push(parse_server(line).map_err(|e| e.at_line(number))?);
        }
    }
    Ok(list)
}

fn error(field: &str, expected: &str, found: String) -> ParseError {
    ParseError::new(Format::Text, expected, found).in_field(field)
}

fn parse_server(line: &str) -> Result<ServerEntry, ParseError> {
    let mut tokens = line.split_whitespace();
    let mut next = |field: &str, expected: &str| {
        tokens
            .next()
            .ok_or_else(|| error(field, expected, "the end of the line".to_string()))
    };
    let url = next("URL", "a url")?.to_string();
    let status = next("STATUS", "a status (UP, DOWN or DRAINING)")?;
    let users = next("USERS", "a non-negative integer")?;
    let priority = next("PRIORITY", "a priority group label")?.to_string();
    let status = field::status(Format::Text, "STATUS", status)?;
    let users = field::count(Format::Text, "USERS", users)?;
    let mut entry = ServerEntry::new("", url, status, users, priority);
    let mut seen = HashSet::new();
    for token in tokens {
        if token.starts_with('#') {
            break;
        }
        let (key, value) = key_value(token)?;
        if POSITIONAL.contains(&key.as_str()) || !seen.insert(key.clone()) {
            return Err(field::repeated(Format::Text, &key));
        }
        match key.as_str() {
            "name" => entry.name = value,
            "capacity" => entry.capacity = Some(field::count(Format::Text, &key, &value)?),
            "join_rate" => entry.join_rate = Some(field::rate(Format::Text, &key, &value)?),
            "users_age_ms" => {
                entry.users_age_ms = Some(field::count(Format::Text, &key, &value)?);
            }
            _ => {
                entry.extra.insert(key, plain_to_extra(&value));
            }
        }
    }
    Ok(entry)
}

fn parse_list_fields(fields: &str, list: &mut FarmList) -> Result<(), ParseError> {
    let mut extra = Map::new();
    for token in fields.split_whitespace() {
        let (key, value) = key_value(token)?;
        if key == "servers" || extra.contains_key(&key) {
            return Err(field::repeated(Format::Text, &key));
        }
        if key == "generated_at_ms" {
            if list.generated_at_ms.is_some() {
                return Err(field::repeated(Format::Text, &key));
            }
            list.generated_at_ms = Some(field::timestamp(Format::Text, &key, &value)?);
        } else if key == "in_flight" {
            if list.in_flight.is_some() {
                return Err(field::repeated(Format::Text, &key));
            }
            list.in_flight = Some(field::count(Format::Text, &key, &value)?);
        } else if key == "draw" {
            if list.draw.is_some() {
                return Err(field::repeated(Format::Text, &key));
            }
            list.draw = Some(field::draw(Format::Text, &key, &value)?);
        } else {
            extra.insert(key, plain_to_extra(&value));
        }
    }
    for (key, value) in extra {
        if list.extra.insert(key.clone(), value).is_some() {
            return Err(field::repeated(Format::Text, &key));
        }
    }
    Ok(())
}

/// Splits `key=value` and decodes both halves.
fn key_value(token: &str) -> Result<(String, String), ParseError> {
    let Some((key, value)) = token.split_once('=') else {
        return Err(ParseError::new(
            Format::Text,
            "a key=value field",
            quoted(token),
        ));
    };
    let key = decode(key).map_err(|found| error(key, "a percent-encoded field name", found))?;
    let value = decode(value).map_err(|found| error(&key, "a percent-encoded value", found))?;
    Ok((key, value))
}

/// Whether `c` must be percent-encoded in a `key=value` field.
fn must_encode(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '%' | '=' | '#')
}

fn push_escaped(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for byte in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, "%{byte:02X}");
    }
}

/// Percent-encodes what a `key=value` field cannot hold verbatim.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if must_encode(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// A positional field: verbatim, except what would break the line (see the module doc).
fn verbatim(s: &str, is_url: bool) -> String {
    if s.is_empty() {
        return "-".to_string();
    }
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        // A leading `#` would make a comment, a leading U+FEFF would be read as a byte-order mark.
        if c.is_whitespace()
            || c.is_control()
            || (is_url && i == 0 && matches!(c, '#' | '\u{feff}'))
        {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes `%XX` escapes; the error says what was found wrong.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|_| bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit());
            let Some(byte) = hex else {
                let end = s.len().min(i + 3);
                let shown = s.get(i..end).unwrap_or(&s[i..]);
                return Err(format!("{} in {}", quoted(shown), quoted(s)));
            };
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("escapes that are not UTF-8 in {}", quoted(s)))
}
