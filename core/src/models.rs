//! `GET /v1/models`: the model list every host answers with locally, from
//! the config alone (the gateway and nginx serve the same bytes).

use serde_json::{json, Value};

use crate::config::Config;

/// The ids `GET /v1/models` lists: `gateway.models` when set, else the
/// backend names, in config order.
pub fn model_ids(config: &Config) -> Vec<String> {
    if config.gateway.models.is_empty() {
        config.backends.iter().map(|b| b.name.clone()).collect()
    } else {
        config.gateway.models.clone()
    }
}

/// The body of `GET /v1/models`: an OpenAI model list (`{"object": "list",
/// "data": [{"id", "object": "model", "created": 0, "owned_by":
/// "llmproxy"}, ...]}`) of [`model_ids`].
pub fn models_body(config: &Config) -> String {
    let data: Vec<Value> = model_ids(config)
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llmproxy"}))
        .collect();
    json!({"object": "list", "data": data}).to_string()
}

/// The body of `GET /healthz`: the host is up and has a config loaded.
pub const HEALTHZ_BODY: &str = r#"{"status":"ok"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        match Config::from_yaml(yaml, std::path::Path::new(".")) {
            Ok(c) => c,
            Err(e) => panic!("config: {e:?}"),
        }
    }

    #[test]
    fn models_list_the_configured_ids_else_the_backend_names() {
        let backends =
            "backends:\n  - {name: a, url: \"http://127.0.0.1:1\"}\n  - {name: b, url: \"http://127.0.0.1:2\"}\n";
        let cases = [
            ("", vec!["a", "b"]),
            (
                "gateway: {models: [gpt-4, gpt-4o-mini]}\n",
                vec!["gpt-4", "gpt-4o-mini"],
            ),
        ];
        for (extra, want) in cases {
            let c = config(&format!("{backends}{extra}"));
            assert_eq!(model_ids(&c), want, "{extra}");
            let body: Value = serde_json::from_str(&models_body(&c)).unwrap_or_default();
            assert_eq!(body["object"], "list");
            let ids: Vec<&str> = body["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["id"].as_str())
                .collect();
            assert_eq!(ids, want);
            assert_eq!(body["data"][0]["owned_by"], "llmproxy");
        }
    }
}
