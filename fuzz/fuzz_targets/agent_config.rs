//! AgentConfig decoding, from its JSON and from the base64 form `SIDEKEY_AGENT_CONFIG` carries.
//! A config that decodes must survive the injector's encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey_agent::AgentConfig;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(config) = AgentConfig::from_json(bytes) {
        let again =
            AgentConfig::from_env_value(&config.to_env_value()).expect("an encoded config decodes");
        assert_eq!(again, config);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = AgentConfig::from_env_value(text);
    }
});
