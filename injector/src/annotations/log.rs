//! The agents' logging: `log-level` and `log-format` (Vault Agent's `standard` is text), with the
//! injector's defaults.

use sidekey_agent::config::{LogConfig, LogFormat};

use super::AnnotationError;
use super::lookup::Lookup;
use crate::config::Defaults;

/// Reads the log group.
pub(super) fn parse(look: &Lookup<'_>, defaults: &Defaults) -> Result<LogConfig, AnnotationError> {
    let level = look
        .nonempty("log-level")
        .unwrap_or_else(|| defaults.agent_log_level.clone());
    let level = match level.to_lowercase().as_str() {
        l @ ("trace" | "debug" | "info" | "error") => l.to_string(),
        "warn" | "warning" => "warn".to_string(),
        _ => {
            return Err(look.error(
                "log-level",
                format!("{level:?} is not trace, debug, info, warn or error"),
            ));
        }
    };
    let format = look
        .nonempty("log-format")
        .unwrap_or_else(|| defaults.agent_log_format.clone());
    let format = match format.as_str() {
        "json" => LogFormat::Json,
        "standard" | "text" => LogFormat::Text,
        _ => {
            return Err(look.error("log-format", format!("{format:?} is not json or standard")));
        }
    };
    Ok(LogConfig { level, format })
}
