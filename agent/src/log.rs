//! Logging set-up: JSON or text lines on stderr at the configured level. `SIDEKEY_LOG` (an
//! env-filter directive) overrides the level. Nothing here ever formats a secret: tokens are a
//! redacting type and rendered text never reaches a log call.

use crate::config::{LogConfig, LogFormat};

pub fn init(log: &LogConfig) {
    let filter = std::env::var("SIDEKEY_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            // Dependencies stay quiet below warn: their debug lines are noise, and a template
            // engine's debug output is too close to rendered content to risk.
            tracing_subscriber::EnvFilter::new(format!("warn,sidekey_agent={}", log.level))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
