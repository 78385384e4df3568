//! XML: one `<server>` element per server inside a `<farm>` root.
//!
//! ```xml
//! <?xml version="1.0" encoding="UTF-8"?>
//! <farm generated_at_ms="1700000000000">
//!   <server name="a" url="ws://10.0.0.1:7400/stream" status="UP" users="12" priority="A" capacity="10000" join_rate="2.5" users_age_ms="150"/>
//!   <server name="b" url="ws://10.0.0.2:7400/stream" status="DOWN" users="0" priority="B">
//!     <extra key="zone" value="eu-west"/>
//!   </server>
//! </farm>
//! ```
//!
//! `url`, `status`, `users` and `priority` are required; `name` may be left out (it is then empty);
//! `capacity`, `join_rate`, `users_age_ms` and the farm's `generated_at_ms` are written when known. Unknown fields
//! are `<extra key="…" value="…"/>` children of `<server>` (or of `<farm>` for the list's own), the
//! value read as in [`crate::encoding`]. When reading, an unknown attribute of `<server>` or
//! `<farm>` is kept the same way, and unknown elements, comments and text are skipped.
//!
//! Attribute values are escaped (`&amp;`, `&quot;`, `&#10;` …), so every string survives except
//! U+0000, which XML cannot hold: the renderer writes it as U+FFFD.

use std::borrow::Cow;
use std::fmt::Write as _;

use quick_xml::Reader;
use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use serde_json::{Map, Value};

use super::{
    Format, LIST_FIELDS, ParseError, SERVER_FIELDS, extra_to_plain, field, plain_to_extra,
};
use crate::model::{FarmList, ServerEntry};

/// Writes `list` as XML.
pub fn render(list: &FarmList) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<farm");
    if let Some(at) = list.generated_at_ms {
        let _ = write!(out, " generated_at_ms=\"{at}\"");
    }
    if let Some(n) = list.in_flight {
        let _ = write!(out, " in_flight=\"{n}\"");
    }
    if let Some(d) = list.draw {
        let _ = write!(out, " draw=\"{d}\"");
    }
    out.push_str(">\n");
    write_extras(&mut out, &list.extra, "  ");
    for s in &list.servers {
        out.push_str("  <server");
        if !s.name.is_empty() {
            attribute(&mut out, "name", &s.name);
        }
        attribute(&mut out, "url", &s.url);
        attribute(&mut out, "status", s.status.as_str());
        attribute(&mut out, "users", &s.users.to_string());
        attribute(&mut out, "priority", &s.priority);
        if let Some(capacity) = s.capacity {
            attribute(&mut out, "capacity", &capacity.to_string());
        }
        if let Some(rate) = s.join_rate {
            attribute(&mut out, "join_rate", &rate.to_string());
        }
        if let Some(age) = s.users_age_ms {
            attribute(&mut out, "users_age_ms", &age.to_string());
        }
        if s.extra.is_empty() {
            out.push_str("/>\n");
        } else {
            out.push_str(">\n");
            write_extras(&mut out, &s.extra, "    ");
            out.push_str("  </server>\n");
        }
    }
    out.push_str("</farm>\n");
    out
}

fn write_extras(out: &mut String, extra: &Map<String, Value>, indent: &str) {
    for (key, value) in extra {
        out.push_str(indent);
        out.push_str("<extra");
        attribute(out, "key", key);
        attribute(out, "value", &extra_to_plain(value));
        out.push_str("/>\n");
    }
}

/// ` name="value"`, escaped so that attribute-value normalisation gives the value back.
fn attribute(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, " {name}=\"");
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\0' => out.push('\u{fffd}'),
            c if c.is_control() => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Reads an XML list.
pub fn parse(input: &str) -> Result<FarmList, ParseError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let mut reader = Reader::from_str(input);
    let line_at = |position: u64| {
        let position = usize::try_from(position)
            .unwrap_or(usize::MAX)
            .min(input.len());
        input.as_bytes()[..position]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    };
    let mut list: Option<FarmList> = None;
    // The elements we are inside of; empty before <farm> and after </farm>.
    let mut path: Vec<Element> = Vec::new();
    loop {
        let position = reader.buffer_position();
        let event = reader.read_event().map_err(|e| {
            ParseError::new(Format::Xml, "well-formed XML", e.to_string())
                .at_line(line_at(reader.error_position()))
        })?;
        let located = |e: ParseError| e.at_line(line_at(position));
        let (start, is_empty) = match event {
            Event::Start(start) => (start, false),
            Event::Empty(start) => (start, true),
            Event::End(_) => {
                path.pop();
                if path.is_empty() {
                    break;
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let element = match (list.as_mut(), path.last()) {
            (None, _) => {
                if start.name().as_ref() != "farm" {
                    return Err(located(ParseError::new(
                        Format::Xml,
                        "a <farm> root element",
                        format!("<{}>", start.name().as_ref()),
                    )));
                }
                let mut farm = FarmList::default();
                read_farm_attributes(&start, &mut farm).map_err(located)?;
                list = Some(farm);
                Element::Farm
            }
            (Some(farm), Some(Element::Farm)) => match start.name().as_ref() {
                "server" => {
                    farm.servers.push(read_server(&start).map_err(located)?);
                    Element::Server
                }
                "extra" => {
                    read_extra(&start, &mut farm.extra, LIST_FIELDS).map_err(located)?;
                    Element::Other
                }
                _ => Element::Other,
            },
            (Some(farm), Some(Element::Server)) if start.name().as_ref() == "extra" => {
                if let Some(server) = farm.servers.last_mut() {
                    read_extra(&start, &mut server.extra, SERVER_FIELDS).map_err(located)?;
                }
                Element::Other
            }
            _ => Element::Other,
        };
        if !is_empty {
            path.push(element);
        } else if path.is_empty() {
            // `<farm/>`: an empty list, and the end of it.
            break;
        }
    }
    if !path.is_empty() {
        return Err(
            ParseError::new(Format::Xml, "</farm>", "the end of the input")
                .at_line(line_at(input.len() as u64)),
        );
    }
    list.ok_or_else(|| {
        ParseError::new(Format::Xml, "a <farm> root element", "none").at_line(line_at(0))
    })
}

/// Elements we are inside of.
enum Element {
    Farm,
    Server,
    Other,
}

/// The attributes of an element as (name, value) pairs, values unescaped and normalised.
fn attributes<'a>(start: &'a BytesStart<'a>) -> Result<Vec<(String, Cow<'a, str>)>, ParseError> {
    let mut out = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute
            .map_err(|e| ParseError::new(Format::Xml, "well-formed attributes", e.to_string()))?;
        let name = attribute.key.as_ref().to_string();
        let value = attribute
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| {
                ParseError::new(Format::Xml, "a well-escaped value", e.to_string()).in_field(&name)
            })?;
        out.push((name, value));
    }
    Ok(out)
}

fn read_farm_attributes(start: &BytesStart<'_>, farm: &mut FarmList) -> Result<(), ParseError> {
    for (name, value) in attributes(start)? {
        if name == "generated_at_ms" {
            farm.generated_at_ms = Some(field::timestamp(Format::Xml, &name, &value)?);
        } else if name == "in_flight" {
            farm.in_flight = Some(field::count(Format::Xml, &name, &value)?);
        } else if name == "draw" {
            farm.draw = Some(field::draw(Format::Xml, &name, &value)?);
        } else if name != "servers" {
            farm.extra.insert(name, plain_to_extra(&value));
        }
    }
    Ok(())
}

fn read_server(start: &BytesStart<'_>) -> Result<ServerEntry, ParseError> {
    let mut name = String::new();
    let mut url = None;
    let mut status = None;
    let mut users = None;
    let mut priority = None;
    let mut capacity = None;
    let mut join_rate = None;
    let mut users_age_ms = None;
    let mut extra = Map::new();
    for (key, value) in attributes(start)? {
        match key.as_str() {
            "name" => name = value.into_owned(),
            "url" => url = Some(value.into_owned()),
            "status" => status = Some(field::status(Format::Xml, &key, &value)?),
            "users" => users = Some(field::count(Format::Xml, &key, &value)?),
            "priority" => priority = Some(value.into_owned()),
            "capacity" => capacity = Some(field::count(Format::Xml, &key, &value)?),
            "join_rate" => join_rate = Some(field::rate(Format::Xml, &key, &value)?),
            "users_age_ms" => users_age_ms = Some(field::count(Format::Xml, &key, &value)?),
            _ => {
                extra.insert(key, plain_to_extra(&value));
            }
        }
    }
    let missing = |field: &str| {
        ParseError::new(Format::Xml, format!("a `{field}` attribute"), "none").in_field(field)
    };
    let mut entry = ServerEntry::new(
        name,
        url.ok_or_else(|| missing("url"))?,
        status.ok_or_else(|| missing("status"))?,
        users.ok_or_else(|| missing("users"))?,
        priority.ok_or_else(|| missing("priority"))?,
    );
    entry.capacity = capacity;
    entry.join_rate = join_rate;
    entry.users_age_ms = users_age_ms;
    entry.extra = extra;
    Ok(entry)
}

fn read_extra(
    start: &BytesStart<'_>,
    extra: &mut Map<String, Value>,
    known: &[&str],
) -> Result<(), ParseError> {
    let mut key = None;
    let mut value = None;
    for (name, text) in attributes(start)? {
        match name.as_str() {
            "key" => key = Some(text.into_owned()),
            "value" => value = Some(text.into_owned()),
            _ => {}
        }
    }
    let missing = |field: &str| {
        ParseError::new(
            Format::Xml,
            format!("a `{field}` attribute on <extra>"),
            "none",
        )
        .in_field(format!("extra {field}"))
    };
    let key = key.ok_or_else(|| missing("key"))?;
    let value = value.ok_or_else(|| missing("value"))?;
    if known.contains(&key.as_str()) || extra.contains_key(&key) {
        return Err(field::repeated(Format::Xml, &key));
    }
    extra.insert(key, plain_to_extra(&value));
    Ok(())
}
