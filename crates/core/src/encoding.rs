//! The farm list on the wire: JSON, plain text, XML and JavaScript, each with a renderer and a
//! parser that round-trip.
//!
//! A list server hands a client the farm list "as text, JavaScript, XML or another format that
//! suits the client" (the seeds). [`Format`] names the four encodings and maps them to HTTP
//! (`?format=`, `Accept`, `Content-Type`); [`render`] writes a [`FarmList`]; [`parse`] reads one
//! back, and [`detect`]/[`parse_detected`] read a list whose format is not known in advance (a file
//! given to `streamfarm pick`). Every parser returns a [`ParseError`] naming the line, the field,
//! what was expected and what was found; none panics, whatever the input.
//!
//! | format | shape | module |
//! |---|---|---|
//! | [`Format::Json`] | `{"servers":[{"name":"a","url":"ws://…","status":"UP","users":12,"priority":"A"}]}` | [`json`] |
//! | [`Format::Text`] | one server per line, `URL STATUS USERS PRIORITY [key=value]…` | [`text`] |
//! | [`Format::Xml`] | `<farm><server name="a" url="ws://…" status="UP" users="12" priority="A"/></farm>` | [`xml`] |
//! | [`Format::Js`] | `streamfarmFarm({…json…});` — a JSONP script that hands the list to a callback | [`js`] |
//!
//! JSON is the reference: every field of the model, unknown ones included, survives it. The other
//! three hold the same data losslessly, with the limits each module documents (the text format's
//! url and priority cannot hold whitespace; XML cannot hold U+0000).
//!
//! Values of unknown fields (`extra`) are JSON values; where a format writes them as plain strings
//! (text `key=value`, XML attributes) the rule is the same: a value that reads as JSON (`12`,
//! `true`, `null`, `"12"`, `[1,2]`) is that JSON value, anything else is a string. A string that
//! would read as JSON is therefore written as a JSON string literal (`"12"`), so nothing changes
//! type on the way through.
//!
//! ```
//! use streamfarm_core::encoding::{self, Format};
//! let list = encoding::parse("http://serverA.caplin.com UP 2963 A\n", Format::Text).unwrap();
//! assert_eq!(list.servers[0].users, 2963);
//! let json = encoding::render(&list, Format::Json);
//! assert_eq!(encoding::parse_detected(&json).unwrap(), list);
//! ```

use std::fmt;

use serde_json::Value;

use crate::model::FarmList;

pub mod js;
pub mod json;
pub mod text;
pub mod xml;

pub use js::{DEFAULT_CALLBACK, render_js};

/// One of the encodings of the farm list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// JSON, the DESIGN.md shape; the default.
    Json,
    /// Plain text, one server per line: the description's own format.
    Text,
    /// XML, one `<server>` element per server inside `<farm>`.
    Xml,
    /// JavaScript: a JSONP call that hands the JSON list to a callback.
    Js,
}

impl Format {
    /// Every format, in order of preference when a client accepts several equally.
    pub const ALL: [Format; 4] = [Format::Json, Format::Text, Format::Xml, Format::Js];

    /// The format's name in `?format=` and `--format`: `json`, `text`, `xml` or `js`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
            Format::Xml => "xml",
            Format::Js => "js",
        }
    }

    /// The format named `s`, case-insensitively; `txt` and `javascript` are accepted too.
    pub fn from_name(s: &str) -> Option<Format> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "json" => Some(Format::Json),
            "text" | "txt" => Some(Format::Text),
            "xml" => Some(Format::Xml),
            "js" | "javascript" => Some(Format::Js),
            _ => None,
        }
    }

    /// The `Content-Type` a list server sends with a list in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Text => "text/plain; charset=utf-8",
            Format::Xml => "application/xml",
            Format::Js => "application/javascript",
        }
    }

    /// The media types (lowercase) that name this format in an `Accept` header.
    fn media_types(self) -> &'static [&'static str] {
        match self {
            Format::Json => &["application/json"],
            Format::Text => &["text/plain"],
            Format::Xml => &["application/xml", "text/xml"],
            Format::Js => &[
                "application/javascript",
                "text/javascript",
                "application/x-javascript",
                "application/ecmascript",
                "text/ecmascript",
            ],
        }
    }

    /// The format to answer an HTTP `Accept` header with, or `None` when it accepts none of ours
    /// (answer 406).
    ///
    /// Each format gets the quality of the most specific media range that matches it (an exact
    /// type beats `type/*`, which beats `*/*`); `q=0` refuses it. The format with the highest
    /// quality wins; a tie goes to the range listed first, then to the order of [`Format::ALL`].
    /// An empty header accepts anything, like `*/*`, and so gives JSON.
    ///
    /// ```
    /// use streamfarm_core::encoding::Format;
    /// assert_eq!(Format::from_accept("text/plain"), Some(Format::Text));
    /// assert_eq!(Format::from_accept("text/html, application/xml;q=0.9, */*;q=0.8"), Some(Format::Xml));
    /// assert_eq!(Format::from_accept("application/json;q=0, */*"), Some(Format::Text));
    /// assert_eq!(Format::from_accept("image/png"), None);
    /// ```
    pub fn from_accept(accept: &str) -> Option<Format> {
        if accept.trim().is_empty() {
            return Some(Format::Json);
        }
        let ranges: Vec<MediaRange> = accept.split(',').filter_map(MediaRange::parse).collect();
        let mut best: Option<(Format, f64, usize)> = None;
        for format in Format::ALL {
            // The most specific range that matches this format decides its quality.
            let Some((q, index)) = ranges
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.specificity(format).map(|s| (s, i, r.q)))
                .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                .map(|(_, i, q)| (q, i))
            else {
                continue;
            };
            if q <= 0.0 {
                continue;
            }
            let better = match best {
                None => true,
                Some((_, best_q, best_index)) => q > best_q || (q == best_q && index < best_index),
            };
            if better {
                best = Some((format, q, index));
            }
        }
        best.map(|(format, _, _)| format)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One media range of an `Accept` header: `type/subtype;q=0.5`.
struct MediaRange {
    kind: String,
    subtype: String,
    q: f64,
}

impl MediaRange {
    /// `None` for a range we cannot read (no `/`, a bad `q`): ignoring it is the safe reading.
    fn parse(range: &str) -> Option<MediaRange> {
        let mut parts = range.split(';');
        let media = parts.next()?.trim().to_ascii_lowercase();
        let (kind, subtype) = media.split_once('/')?;
        let mut q = 1.0;
        for param in parts {
            if let Some((key, value)) = param.split_once('=')
                && key.trim().eq_ignore_ascii_case("q")
            {
                q = value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q))?;
            }
        }
        Some(MediaRange {
            kind: kind.trim().to_string(),
            subtype: subtype.trim().to_string(),
            q,
        })
    }

    /// How specifically this range names `format`: 2 exact, 1 `type/*`, 0 `*/*`; `None` if not.
    fn specificity(&self, format: Format) -> Option<u8> {
        if self.kind == "*" && self.subtype == "*" {
            return Some(0);
        }
        format
            .media_types()
            .iter()
            .filter_map(|t| {
                let (kind, subtype) = t.split_once('/')?;
                if kind != self.kind {
                    None
                } else if subtype == self.subtype {
                    Some(2)
                } else if self.subtype == "*" {
                    Some(1)
                } else {
                    None
                }
            })
            .max()
    }
}

/// A list that could not be read (or, for [`render_js`], a callback name that is not valid).
///
/// Displays as `text list, line 3, field USERS: expected a non-negative integer, found "x"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ParseError {
    /// The format being read.
    pub format: Format,
    /// The line (1-based), when known.
    pub line: Option<usize>,
    /// The column (1-based, in characters for text, bytes for JSON), when known.
    pub column: Option<usize>,
    /// The field, when known: `USERS` for the text format's positional fields, else the name.
    pub field: Option<String>,
    /// What the parser expected there.
    pub expected: String,
    /// What it found instead, as shown to a person (quoted when it is input text).
    pub found: String,
}

impl ParseError {
    /// An error with nothing located yet.
    pub(crate) fn new(
        format: Format,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        ParseError {
            format,
            line: None,
            column: None,
            field: None,
            expected: expected.into(),
            found: found.into(),
        }
    }

    pub(crate) fn at_line(mut self, line: usize) -> Self {
        self.line = Some(line);
        self
    }

    pub(crate) fn at_column(mut self, column: usize) -> Self {
        self.column = Some(column);
        self
    }

    pub(crate) fn in_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    fn describe(&self) -> String {
        let mut out = format!("{} list", self.format);
        if let Some(line) = self.line {
            out.push_str(&format!(", line {line}"));
        }
        if let Some(column) = self.column {
            out.push_str(&format!(", column {column}"));
        }
        if let Some(field) = &self.field {
            out.push_str(&format!(", field {field}"));
        }
        out.push_str(&format!(
            ": expected {}, found {}",
            self.expected, self.found
        ));
        out
    }
}

/// Input text as shown in an error: quoted, and cut short when long.
pub(crate) fn quoted(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() > MAX {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}…")
    } else {
        format!("{s:?}")
    }
}

/// The fields of a server entry that the model names: an unknown (`extra`) field may not use them.
pub(crate) const SERVER_FIELDS: &[&str] = &[
    "name",
    "url",
    "status",
    "users",
    "priority",
    "capacity",
    "join_rate",
    "users_age_ms",
];

/// The fields of a list that the model names.
pub(crate) const LIST_FIELDS: &[&str] = &["servers", "generated_at_ms", "in_flight", "draw"];

/// Readers of the typed fields that text and XML spell as strings; `field` names the field in
/// the error, as the format calls it.
pub(crate) mod field {
    use super::{Format, ParseError, quoted};
    use crate::model::Status;

    /// `UP`, `DOWN` or `DRAINING`, any case.
    pub(crate) fn status(format: Format, field: &str, value: &str) -> Result<Status, ParseError> {
        value.trim().parse().map_err(|_| {
            ParseError::new(format, "a status (UP, DOWN or DRAINING)", quoted(value))
                .in_field(field)
        })
    }

    /// A number of users (`users`, `capacity`), or of milliseconds (`users_age_ms`).
    pub(crate) fn count(format: Format, field: &str, value: &str) -> Result<u64, ParseError> {
        value.trim().parse().map_err(|_| {
            ParseError::new(format, "a non-negative integer", quoted(value)).in_field(field)
        })
    }

    /// A join rate: arrivals per second, finite and not negative.
    pub(crate) fn rate(format: Format, field: &str, value: &str) -> Result<f64, ParseError> {
        value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| {
                ParseError::new(format, "a finite non-negative number", quoted(value))
                    .in_field(field)
            })
    }

    /// The list's `draw`: a number in `[0, 1)`.
    pub(crate) fn draw(format: Format, field: &str, value: &str) -> Result<f64, ParseError> {
        value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|d| (0.0..1.0).contains(d))
            .ok_or_else(|| {
                ParseError::new(
                    format,
                    "a number from 0 up to (not including) 1",
                    quoted(value),
                )
                .in_field(field)
            })
    }

    /// The list's `generated_at_ms`.
    pub(crate) fn timestamp(format: Format, field: &str, value: &str) -> Result<u64, ParseError> {
        value.trim().parse().map_err(|_| {
            ParseError::new(format, "milliseconds since the Unix epoch", quoted(value))
                .in_field(field)
        })
    }

    /// A field given twice (or an extra field named like a known one).
    pub(crate) fn repeated(format: Format, field: &str) -> ParseError {
        ParseError::new(
            format,
            "each field once",
            format!("{} again", quoted(field)),
        )
        .in_field(field)
    }
}

/// Writes `list` in `format`. JavaScript uses [`DEFAULT_CALLBACK`]; see [`render_js`] for another.
pub fn render(list: &FarmList, format: Format) -> String {
    match format {
        Format::Json => json::render(list),
        Format::Text => text::render(list),
        Format::Xml => xml::render(list),
        Format::Js => js::render(list, DEFAULT_CALLBACK),
    }
}

/// Reads a list written in `format`.
pub fn parse(input: &str, format: Format) -> Result<FarmList, ParseError> {
    match format {
        Format::Json => json::parse(input),
        Format::Text => text::parse(input),
        Format::Xml => xml::parse(input),
        Format::Js => js::parse(input),
    }
}

/// Guesses the format of `input` from its first significant character: `{` or `[` is JSON, `<` is
/// XML, an identifier path followed by `(` is JavaScript, anything else (a URL, a `#` comment,
/// nothing at all) is text. A text list whose first url is not a URL (`<x`, `f(x)`) may be taken
/// for another format: name the format then.
pub fn detect(input: &str) -> Format {
    let trimmed = input.trim_start_matches('\u{feff}').trim_start();
    match trimmed.chars().next() {
        Some('{' | '[') => Format::Json,
        Some('<') => Format::Xml,
        _ if js::starts_with_call(trimmed) => Format::Js,
        _ => Format::Text,
    }
}

/// Reads a list in whichever format [`detect`] sees.
pub fn parse_detected(input: &str) -> Result<FarmList, ParseError> {
    parse(input, detect(input))
}

/// An `extra` value as a plain string: strings as themselves unless they would read as JSON, then
/// (like every other value) as compact JSON. See the module doc.
pub(crate) fn extra_to_plain(value: &Value) -> String {
    match value {
        Value::String(s) if !s.is_empty() && serde_json::from_str::<Value>(s).is_err() => s.clone(),
        other => other.to_string(),
    }
}

/// The inverse of [`extra_to_plain`].
pub(crate) fn plain_to_extra(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

#[cfg(test)]
mod tests;
