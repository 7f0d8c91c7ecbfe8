//! Template commands and actions as the injector reads them from annotations: any text is
//! either refused with a message or read into steps, never a panic; an action that reads
//! writes back as text that reads to the same action.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey_agent::action::Action;
use sidekey_agent::command;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Err(e) = command::parse(text) {
        let _ = e.to_string();
    }
    if let Ok(actions) = Action::parse_list(text) {
        for a in actions {
            assert_eq!(Action::parse(&a.text()).as_ref(), Ok(&a));
        }
    }
});
