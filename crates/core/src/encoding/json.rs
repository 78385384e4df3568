//! JSON, the reference encoding and the list server's default.
//!
//! The shape is DESIGN.md's: `{"servers":[{"name":"a","url":"ws://127.0.0.1:7400/stream",
//! "status":"UP","users":12,"priority":"A"}]}`, with `capacity`, `join_rate`, `users_age_ms`
//! and `generated_at_ms` when known and any unknown field kept (see [`crate::model`]). `name` may be
//! left out (it is then empty). Rendering is compact, one line.

use super::{Format, ParseError};
use crate::model::FarmList;

/// Writes `list` as compact JSON.
pub fn render(list: &FarmList) -> String {
    // A FarmList holds only strings, integers, finite-or-null floats and JSON values: serde_json
    // cannot fail on it.
    serde_json::to_string(list).unwrap_or_else(|_| String::from(r#"{"servers":[]}"#))
}

/// Reads a JSON list.
pub fn parse(input: &str) -> Result<FarmList, ParseError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    serde_json::from_str(input).map_err(from_serde)
}

/// Turns a serde_json error into a [`ParseError`], keeping its line and column and splitting its
/// message into what was expected and what was found.
pub(crate) fn from_serde(err: serde_json::Error) -> ParseError {
    let full = err.to_string();
    let location = format!(" at line {} column {}", err.line(), err.column());
    let message = full.strip_suffix(&location).unwrap_or(&full);
    let mut error = describe(message);
    if err.line() > 0 {
        error = error.at_line(err.line()).at_column(err.column());
    }
    error
}

/// serde's Rust type names in words a list writer knows.
fn plain_type(expected: &str) -> &str {
    match expected {
        "u64" => "a non-negative integer",
        "f64" => "a number",
        "a string" | "string" => "a string",
        other => other,
    }
}

fn describe(message: &str) -> ParseError {
    let between = |s: &str| s.split('`').nth(1).map(str::to_string);
    if let Some(rest) = message.strip_prefix("missing field ") {
        let field = between(rest).unwrap_or_else(|| rest.to_string());
        return ParseError::new(Format::Json, format!("field `{field}`"), "nothing")
            .in_field(field);
    }
    if let Some(rest) = message.strip_prefix("duplicate field ") {
        let field = between(rest).unwrap_or_else(|| rest.to_string());
        return ParseError::new(Format::Json, "each field once", format!("`{field}` twice"))
            .in_field(field);
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        // Only `status` is an enum in the list.
        let (found, expected) = rest
            .split_once(", expected ")
            .unwrap_or((rest, "a known value"));
        return ParseError::new(Format::Json, expected, found).in_field("status");
    }
    for prefix in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((found, expected)) = rest.split_once(", expected ")
        {
            return ParseError::new(Format::Json, plain_type(expected), found);
        }
    }
    if let Some(what) = message.strip_prefix("EOF while parsing ") {
        return ParseError::new(Format::Json, what, "the end of the input");
    }
    if let Some(expected) = message.strip_prefix("expected ") {
        return ParseError::new(Format::Json, expected, "something else");
    }
    if message == "trailing characters" {
        return ParseError::new(Format::Json, "the end of the input", "more characters");
    }
    ParseError::new(Format::Json, "a farm list", message)
}
