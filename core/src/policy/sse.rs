//! What every host does with the data of one server-sent event of a
//! backend's stream before `response_transform` sees it: capture the usage
//! chunk for the usage stage, and undo what the host's forced
//! `stream_options.include_usage` added when the client did not ask for it
//! (`strip_usage`):
//!
//! - `"usage":null`, which backends add to every chunk once usage is asked
//!   for, is removed: without parsing when it is written compactly as the
//!   event's last member (`...,"usage":null}`, as OpenAI writes it), else
//!   by removing the key from the parsed event and encoding it again; a
//!   `"usage"` nested in the event is the backend's content and stays;
//! - the usage chunk itself (a `usage` object and no `choices`) is dropped.
//!
//! A `usage` object is captured whether or not it is stripped. `[DONE]`,
//! events that are not a JSON object, and events that never mention
//! `"usage"` pass untouched. The gateway (`proxy/src/gateway/relay.rs`) and
//! the nginx module (`llmproxy.sse_event`) both call [`event`].

use std::borrow::Cow;

use memchr::memmem;
use serde_json::Value;

use crate::http::usage_probe;

/// The compact form of a null usage as the last member of the event,
/// removed without parsing (all but the closing brace).
const NULL_USAGE_LAST: &[u8] = b",\"usage\":null}";

/// What to do with one event's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// The data to relay (the backend's bytes unless something was
    /// removed); `None` drops the event.
    pub data: Option<Cow<'a, [u8]>>,
    /// The `usage` object the event carried.
    pub usage: Option<Value>,
    /// The event as parsed, when the host asked for it ([`event`]'s
    /// `parse`) and the data is a JSON value: what `response_transform`
    /// and the usage stage see.
    pub parsed: Option<Value>,
}

impl<'a> Event<'a> {
    /// When the event carried usage, the event as the usage stage sees it
    /// (`response.body`): its parse, or `data` (the event as it came)
    /// parsed.
    pub fn usage_body(&self, data: &[u8]) -> Option<Value> {
        self.usage.as_ref()?;
        self.parsed.clone().or_else(|| serde_json::from_slice(data).ok())
    }

    fn pass(data: Cow<'a, [u8]>) -> Self {
        Event {
            data: Some(data),
            usage: None,
            parsed: None,
        }
    }
}

/// Decide what happens to `data`, the `data` field of one event. With
/// `parse`, the event is parsed whenever it is JSON (the host runs
/// `response_transform` on it); without, only as far as its `usage` needs.
pub fn event(data: &[u8], strip_usage: bool, parse: bool) -> Event<'_> {
    if !crate::http::sse::is_content(data) {
        return Event::pass(Cow::Borrowed(data));
    }
    let mentions = memmem::find_iter(data, b"\"usage\"").take(2).count();
    if mentions == 0 && !parse {
        return Event::pass(Cow::Borrowed(data));
    }
    let mut data = Cow::Borrowed(data);
    if strip_usage && data.ends_with(NULL_USAGE_LAST) {
        let mut owned = data.into_owned();
        let end = owned.len() - 1;
        owned.drain(end + 1 - NULL_USAGE_LAST.len()..end);
        data = Cow::Owned(owned);
        if !parse && mentions == 1 {
            return Event::pass(data);
        }
    }
    if parse {
        let Ok(value) = serde_json::from_slice::<Value>(&data) else {
            return Event::pass(data);
        };
        return on_value(data, value, strip_usage);
    }
    // Only the usage is needed: read it without building the rest.
    let Some(probe) = usage_probe::probe(&data) else {
        return Event::pass(data);
    };
    match probe.usage {
        Some(Value::Null) if strip_usage => match serde_json::from_slice::<Value>(&data) {
            Ok(value) => {
                let mut out = on_value(data, value, strip_usage);
                out.parsed = None;
                out
            }
            Err(_) => Event::pass(data),
        },
        Some(usage @ Value::Object(_)) => Event {
            data: (!strip_usage || probe.has_choices).then_some(data),
            usage: Some(usage),
            parsed: None,
        },
        _ => Event::pass(data),
    }
}

/// [`event`] on a parsed event.
fn on_value(data: Cow<'_, [u8]>, mut value: Value, strip_usage: bool) -> Event<'_> {
    let mut data = data;
    if strip_usage && value.get("usage").is_some_and(Value::is_null) {
        if let Some(obj) = value.as_object_mut() {
            obj.remove("usage");
            data = Cow::Owned(value.to_string().into_bytes());
        }
    }
    let usage = value.get("usage").filter(|u| u.is_object()).cloned();
    let has_choices = value
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    let drop = strip_usage && usage.is_some() && !has_choices;
    Event {
        data: (!drop).then_some(data),
        usage,
        parsed: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, data, strip_usage, relayed data or `None` for dropped, usage)
    type Case = (String, String, bool, Option<String>, Option<Value>);

    /// The shared cases (`conformance/sse-events.json`; nginx runs them
    /// through `llmproxy.sse_event` in `t/001-llmproxy-module.t`).
    fn cases() -> Vec<Case> {
        let doc: Value =
            serde_json::from_str(include_str!("../../../conformance/sse-events.json")).expect("sse-events.json");
        doc["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().expect("name").to_owned(),
                    c["data"].as_str().expect("data").to_owned(),
                    c["strip_usage"].as_bool().expect("strip_usage"),
                    c["relayed"].as_str().map(str::to_owned),
                    Some(c["usage"].clone()).filter(|u| !u.is_null()),
                )
            })
            .collect()
    }

    #[test]
    fn every_host_relays_the_same_events() {
        let cases = cases();
        assert!(cases.len() >= 10);
        for (name, data, strip, want_data, want_usage) in cases {
            for parse in [false, true] {
                let out = event(data.as_bytes(), strip, parse);
                let got = out.data.as_deref().map(|d| String::from_utf8_lossy(d).into_owned());
                assert_eq!(got, want_data, "{name} (parse={parse})");
                assert_eq!(out.usage, want_usage, "{name} (parse={parse})");
                let json = serde_json::from_str::<Value>(&data).ok();
                if parse {
                    assert_eq!(out.parsed.is_some(), json.is_some() && data != "[DONE]", "{name}");
                } else {
                    assert!(out.parsed.is_none(), "{name}");
                }
            }
        }
    }

    #[test]
    fn untouched_events_are_not_copied() {
        for data in [
            r#"{"choices":[{"delta":{"content":"hi"}}]}"#,
            "[DONE]",
            r#"{"choices":[],"usage":{"total_tokens":1}}"#,
        ] {
            let out = event(data.as_bytes(), false, false);
            assert!(matches!(out.data, Some(Cow::Borrowed(_))), "{data}");
        }
    }
}
