//! The whole webhook decision: any request body in, an answer (or a malformed-review error) out,
//! called as the server calls it, with a remembered-decisions cache that lives across inputs.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sidekey_injector::config::Defaults;
use sidekey_injector::decisions::Decisions;
use sidekey_injector::review;

fn state() -> &'static (Defaults, Decisions) {
    static STATE: OnceLock<(Defaults, Decisions)> = OnceLock::new();
    STATE.get_or_init(|| {
        let defaults = Defaults {
            vault_address: "https://vault.vault.svc:8200".into(),
            ..Defaults::default()
        };
        (defaults, Decisions::default())
    })
}

fuzz_target!(|body: &[u8]| {
    let (defaults, decisions) = state();
    if let Ok(answer) = review::review_with(body, defaults, Some(decisions)) {
        // The answer the server sends must be JSON.
        let _ = answer.json();
    }
});
