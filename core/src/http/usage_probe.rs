//! The `usage` object of a backend's JSON answer (a whole body or one stream
//! event) without parsing the rest into values.
//!
//! Hosts call this on every answer that mentions `"usage"` (nginx's body
//! filter through `llmproxy.usage(text)`, and [`crate::policy::sse`] for
//! stream events); building the whole document (choices, message text) only
//! to read three numbers was most of nginx's body-filter cost.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::hooks::ResponseBody;

/// A backend's whole (non-stream) answer to an API call, read once for the
/// hooks: its body as `response.body` shows it, and its `usage` object
/// (`None` when absent or not an object).
///
/// With `transform` (response_transform on, which must know before it runs
/// whether the answer is JSON) the body is parsed now: `None` when it is
/// not JSON. Else, with `usage_script`, it is kept as text (`own` makes the
/// owned copy) and parsed only if the script reads it (ADR 060); else it
/// is `None`. The usage is read from the parse, or probed without one.
pub fn answer<T>(
    text: &[u8],
    transform: bool,
    usage_script: bool,
    own: impl FnOnce() -> T,
) -> (Option<ResponseBody>, Option<Json>)
where
    T: AsRef<[u8]> + Send + Sync + 'static,
{
    if transform {
        if let Ok(json) = serde_json::from_slice::<Json>(text) {
            let usage = json.get("usage").filter(|u| u.is_object()).cloned();
            return (Some(json.into()), usage);
        }
    }
    let usage = probe(text).and_then(|p| p.usage).filter(Json::is_object);
    let body = (!transform && usage_script).then(|| ResponseBody::text(own()));
    (body, usage)
}

/// What the body filter needs of an answer.
#[derive(Debug, Default, PartialEq)]
pub struct UsageProbe {
    /// `usage`: absent (`None`), or its value (`Some(Json::Null)` for null).
    pub usage: Option<Json>,
    /// Whether `choices` is a non-empty array.
    pub has_choices: bool,
}

/// Read `usage` and whether `choices` has entries from the JSON object
/// `text`; `None` when `text` is not a JSON object or `usage` is not JSON
/// within serde_json's nesting limit.
pub fn probe(text: &[u8]) -> Option<UsageProbe> {
    let top: Top = serde_json::from_slice(text).ok()?;
    Some(UsageProbe {
        usage: top.usage,
        has_choices: top.choices > 0,
    })
}

/// The top-level object: `usage` parsed where it is met, `choices`
/// counted, the rest skipped. A repeated key keeps its last value, as a
/// full parse does.
struct Top {
    usage: Option<Json>,
    choices: usize,
}

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = Top;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
                let mut top = Top {
                    usage: None,
                    choices: 0,
                };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "usage" => top.usage = Some(map.next_value()?),
                        "choices" => top.choices = map.next_value::<Count>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(top)
            }
        }
        d.deserialize_map(TopVisitor)
    }
}

/// The number of entries of an array; 0 for anything else.
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(0))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
        }
        d.deserialize_any(CountVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_answers_and_events() {
        let cases: &[(&str, Option<UsageProbe>)] = &[
            (
                r#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"total_tokens":5}}"#,
                Some(UsageProbe {
                    usage: Some(json!({"prompt_tokens":3,"total_tokens":5})),
                    has_choices: true,
                }),
            ),
            (
                r#"{"choices":[],"usage":{"total_tokens":7}}"#,
                Some(UsageProbe {
                    usage: Some(json!({"total_tokens":7})),
                    has_choices: false,
                }),
            ),
            (
                r#"{"choices":[{}],"usage":null}"#,
                Some(UsageProbe {
                    usage: Some(Json::Null),
                    has_choices: true,
                }),
            ),
            (
                r#"{"choices":{"a":1}}"#,
                Some(UsageProbe {
                    usage: None,
                    has_choices: false,
                }),
            ),
            (
                r#"{"usage":{"a":1},"usage":{"b":2}}"#,
                Some(UsageProbe {
                    usage: Some(json!({"b":2})),
                    has_choices: false,
                }),
            ),
            (
                r#"{"note":"\"usage\" in a string"}"#,
                Some(UsageProbe {
                    usage: None,
                    has_choices: false,
                }),
            ),
            (r#"[1,2]"#, None),
            (r#"{"usage":"#, None),
            ("not json", None),
        ];
        for (text, want) in cases {
            assert_eq!(&probe(text.as_bytes()), want, "{text}");
        }
    }
}
