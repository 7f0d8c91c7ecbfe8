//! Handlebars preparation: the checks (size, nesting) and the parse that both the injector (at
//! admission) and the agent (before fetching anything) run on a template's text, with the
//! engine given and with it detected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey_agent::config::{DefaultFormat, Engine, TemplateConfig};
use sidekey_agent::render;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    for engine in [Engine::Handlebars, Engine::Auto] {
        let config = TemplateConfig {
            name: "fuzz".into(),
            path: Some("secret/data/app".into()),
            contents: Some(text.to_string()),
            source: None,
            engine,
            format: DefaultFormat::Map,
            file: "fuzz".into(),
            dir: None,
            perms: "0644".into(),
            command: None,
            actions: Vec::new(),
            error_on_missing_key: false,
            left_delimiter: None,
            right_delimiter: None,
        };
        let _ = render::prepare(&config, None);
    }
});
