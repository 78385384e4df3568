//! JavaScript: a JSONP script that hands the list to a callback.
//!
//! `GET /farm?format=js&callback=onFarm` answers `onFarm({"servers":[…]});`, so a page can load
//! the list across origins with `<script src="http://node:7400/farm?format=js&callback=onFarm">`
//! and have `onFarm` called with it. Without `callback` the function is [`DEFAULT_CALLBACK`]
//! (`streamfarmFarm`). The argument is the [`json`](super::json) list, with `<`, U+2028 and
//! U+2029 written as `\u` escapes so the script is safe inline in HTML and in old JavaScript
//! engines.
//!
//! A callback must be an identifier path (`f`, `app.farm.update`, `$cb_1`): anything else could
//! inject script into the page that loads it, so [`render_js`] refuses it.
//!
//! The parser reads what the renderer writes: `name(JSON)` with an optional `;`, whitespace
//! around, and any valid callback name.

use super::{Format, ParseError, json, quoted};
use crate::model::FarmList;

/// The function a JavaScript list calls when the client names none.
pub const DEFAULT_CALLBACK: &str = "streamfarmFarm";

/// Longest callback name accepted: real ones are short, and the name is echoed into the script.
const MAX_CALLBACK_LEN: usize = 128;

/// Writes `list` as a call of `callback`, after checking that `callback` is an identifier path.
///
/// ```
/// use streamfarm_core::{FarmList, encoding::render_js};
/// assert_eq!(render_js(&FarmList::default(), "app.onFarm").unwrap(), "app.onFarm({\"servers\":[]});\n");
/// assert!(render_js(&FarmList::default(), "alert(1);f").is_err());
/// ```
pub fn render_js(list: &FarmList, callback: &str) -> Result<String, ParseError> {
    if !is_callback(callback) {
        return Err(ParseError::new(
            Format::Js,
            "a JavaScript identifier path such as `f` or `app.onFarm`",
            quoted(callback),
        )
        .in_field("callback"));
    }
    Ok(render(list, callback))
}

/// Writes the call; `callback` is already known to be valid.
pub(crate) fn render(list: &FarmList, callback: &str) -> String {
    let json = json::render(list)
        .replace('<', "\\u003c")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029");
    format!("{callback}({json});\n")
}

/// Reads a JavaScript list: `name(JSON);`.
pub fn parse(input: &str) -> Result<FarmList, ParseError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let Some(open) = input.find('(') else {
        return Err(ParseError::new(Format::Js, "callback(list);", "no `(`").at_line(1));
    };
    let name = input[..open].trim();
    let line_of_open = input[..open].matches('\n').count() + 1;
    if !is_callback(name) {
        return Err(ParseError::new(
            Format::Js,
            "a callback name (an identifier path)",
            quoted(name),
        )
        .at_line(line_of_open)
        .in_field("callback"));
    }
    let rest = input[open + 1..].trim_end();
    let rest = rest.strip_suffix(';').unwrap_or(rest).trim_end();
    let Some(body) = rest.strip_suffix(')') else {
        return Err(ParseError::new(Format::Js, "`)` closing the call", "none")
            .at_line(input.trim_end().matches('\n').count() + 1));
    };
    json::parse(body).map_err(|mut e| {
        // The JSON starts right after `(`: move its position into the script's.
        if let Some(line) = e.line {
            if line == 1 {
                let column_of_open = input[..open].rsplit('\n').next().map_or(0, str::len) + 1;
                e.column = e.column.map(|c| c + column_of_open);
            }
            e.line = Some(line + line_of_open - 1);
        }
        e.format = Format::Js;
        e
    })
}

/// Whether `name` is a dotted path of JavaScript identifiers (ASCII only).
fn is_callback(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CALLBACK_LEN
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        })
}

/// Whether `text` begins like a script of ours: an identifier path, then `(`.
pub(crate) fn starts_with_call(text: &str) -> bool {
    text.find('(')
        .is_some_and(|open| is_callback(text[..open].trim_end()))
}
