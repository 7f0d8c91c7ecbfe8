//! The listener's counters, served at `/agent/v1/metrics` in the Prometheus text format under
//! the names Vault Agent's telemetry gives them (`vault.agent.proxy.success` becomes
//! `vault_agent_proxy_success`), so dashboards built for Vault Agent keep working.

use std::sync::atomic::{AtomicU64, Ordering};

/// Each counter's name and help text, in the order of `Counter`.
const COUNTERS: [(&str, &str); 6] = [
    (
        "vault_agent_proxy_success",
        "Proxied requests the store answered (2xx, 3xx).",
    ),
    (
        "vault_agent_proxy_client_error",
        "Proxied requests the store refused (4xx).",
    ),
    (
        "vault_agent_proxy_error",
        "Proxied requests that failed (5xx, store unreachable).",
    ),
    (
        "vault_agent_cache_hit",
        "Requests answered from the lease cache.",
    ),
    (
        "vault_agent_cache_miss",
        "Cacheable requests not found in the lease cache.",
    ),
    (
        "sidekey_agent_cache_renewals",
        "Renewals of the cache's leases and tokens.",
    ),
];

#[derive(Debug, Clone, Copy)]
enum Counter {
    ProxySuccess,
    ProxyClientError,
    ProxyError,
    CacheHit,
    CacheMiss,
    Renewals,
}

#[derive(Debug, Default)]
pub struct Metrics {
    counts: [AtomicU64; COUNTERS.len()],
}

impl Metrics {
    fn bump(&self, c: Counter) {
        self.counts[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The store answered a forwarded request with `status`.
    pub fn proxy_answered(&self, status: u16) {
        self.bump(match status {
            400..=499 => Counter::ProxyClientError,
            500.. => Counter::ProxyError,
            _ => Counter::ProxySuccess,
        });
    }

    /// A forwarded request got no answer (the store is unreachable).
    pub fn proxy_error(&self) {
        self.bump(Counter::ProxyError);
    }

    pub fn cache_hit(&self) {
        self.bump(Counter::CacheHit);
    }

    pub fn cache_miss(&self) {
        self.bump(Counter::CacheMiss);
    }

    pub fn renewed(&self) {
        self.bump(Counter::Renewals);
    }

    /// The Prometheus text exposition of every counter, and the cache's size.
    pub fn render(&self, cache_entries: usize) -> String {
        let mut out = String::new();
        for ((name, help), count) in COUNTERS.iter().zip(&self.counts) {
            let value = count.load(Ordering::Relaxed);
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP sidekey_agent_cache_entries Responses held in the lease cache.\n# TYPE sidekey_agent_cache_entries gauge\nsidekey_agent_cache_entries {cache_entries}\n"
        ));
        out.push_str(&crate::action::COUNTERS.render());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_by_outcome() {
        let m = Metrics::default();
        m.proxy_answered(200);
        m.proxy_answered(204);
        m.proxy_answered(403);
        m.proxy_answered(503);
        m.proxy_error();
        m.cache_hit();
        m.cache_miss();
        m.cache_miss();
        let text = m.render(3);
        for line in [
            "vault_agent_proxy_success 2\n",
            "vault_agent_proxy_client_error 1\n",
            "vault_agent_proxy_error 2\n",
            "vault_agent_cache_hit 1\n",
            "vault_agent_cache_miss 2\n",
            "sidekey_agent_cache_entries 3\n",
            "# TYPE vault_agent_cache_hit counter\n",
            "# TYPE sidekey_agent_actions_performed counter\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }
}
