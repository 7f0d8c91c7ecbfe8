//! The Go-template engine: parse any text (with the default or `[[ ]]` delimiters), then execute
//! it against a fixed in-memory secret data set, in passes as the agent does, with no store I/O:
//! every secret a pass asks for is answered from the data set.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use sidekey_agent::config::{DefaultFormat, Engine, TemplateConfig};
use sidekey_agent::render::{self, Known, Outcome};

/// The secret every path the template names is answered with: a KV v2 read with nested data,
/// numbers, nulls, lists and a non-ASCII key, and a PKI-like payload.
fn secret_for(path: &str) -> serde_json::Value {
    json!({
        "request_id": "fuzz", "lease_id": format!("{path}/lease"), "lease_duration": 60, "renewable": true,
        "warnings": null,
        "data": {
            "data": { "user": "app", "port": 5432, "ratio": 0.5, "empty": "", "nil": null, "ключ": "значение",
                      "tags": ["a", "b", "c"], "nested": { "k": { "deeper": [1, 2, { "x": "y" }] } } },
            "metadata": { "version": 3 },
            "keys": ["one", "two"],
            "certificate": "CERT", "private_key": "KEY", "issuing_ca": "CA", "ca_chain": ["CA1", "CA2"]
        }
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let square = text.starts_with("[[");
    let config = TemplateConfig {
        name: "fuzz".into(),
        path: None,
        contents: Some(text.to_string()),
        source: None,
        engine: Engine::Go,
        format: DefaultFormat::Map,
        file: "fuzz".into(),
        dir: None,
        perms: "0644".into(),
        command: None,
        actions: Vec::new(),
        error_on_missing_key: bytes.len() % 2 == 1,
        left_delimiter: square.then(|| "[[".to_string()),
        right_delimiter: square.then(|| "]]".to_string()),
    };
    let Ok(prepared) = render::prepare(&config, None) else {
        return;
    };
    let mut known = Known::new();
    // A template discovers its secrets pass by pass; each pass answers what the last one asked.
    for _ in 0..4 {
        match render::render(&prepared, &Arc::new(known.clone())) {
            Ok(Outcome::Needs(keys)) => {
                for key in keys {
                    let value = secret_for(&key.path);
                    known.insert(key, value);
                }
            }
            Ok(Outcome::Rendered { .. }) | Err(_) => return,
        }
    }
});
