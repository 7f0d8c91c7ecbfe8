//! Logging set-up: JSON or text lines on stderr at the configured level. `SIDEKEY_LOG` (target
//! directives such as `warn,sidekey_agent=debug`) overrides the level. Directives are plain
//! targets and levels, without env-filter's regular expressions: a regex engine is a large
//! part of the binary, and the binary's pages are most of the agent's memory. Nothing here
//! ever formats a secret: tokens are a redacting type and rendered text never reaches a log
//! call.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogConfig, LogFormat};

/// What is logged: `SIDEKEY_LOG` when it parses, otherwise the agent at the configured level
/// and its dependencies at warn (their debug lines are noise, and a template engine's debug
/// output is too close to rendered content to risk).
pub fn filter(log: &LogConfig, env: Option<&str>) -> Targets {
    env.and_then(|f| f.parse().ok()).unwrap_or_else(|| {
        format!("warn,sidekey_agent={}", log.level)
            .parse()
            .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO))
    })
}

pub fn init(log: &LogConfig) {
    let targets = filter(log, std::env::var("SIDEKEY_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(targets)
            .try_init(),
        LogFormat::Text => builder.finish().with(targets).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn the_level_applies_to_the_agent_and_dependencies_stay_at_warn() {
        let log = LogConfig {
            level: "debug".into(),
            format: LogFormat::Json,
        };
        let f = filter(&log, None);
        assert!(f.would_enable("sidekey_agent::cycle", &Level::DEBUG));
        assert!(!f.would_enable("sidekey_agent::cycle", &Level::TRACE));
        assert!(!f.would_enable("handlebars::render", &Level::INFO));
        assert!(f.would_enable("hyper", &Level::WARN));
        let f = filter(&log, Some("error,sidekey_agent::run=trace"));
        assert!(f.would_enable("sidekey_agent::run", &Level::TRACE));
        assert!(!f.would_enable("sidekey_agent::cycle", &Level::WARN));
        // A directive that does not parse falls back to the configured level.
        let f = filter(&log, Some("sidekey_agent=loud"));
        assert!(f.would_enable("sidekey_agent::cycle", &Level::DEBUG));
    }
}
