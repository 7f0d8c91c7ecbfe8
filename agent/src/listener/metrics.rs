//! The listener's counters, served at `/agent/v1/metrics` in the Prometheus text format under
//! the names Vault Agent's telemetry gives them (`vault.agent.proxy.success` becomes
//! `vault_agent_proxy_success`), so dashboards built for Vault Agent keep working.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    proxy_success: AtomicU64,
    proxy_client_error: AtomicU64,
    proxy_error: AtomicU64,
    cache_hit: AtomicU64,
    cache_miss: AtomicU64,
    renewals: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// The store answered a forwarded request with `status`.
    pub fn proxy_answered(&self, status: u16) {
        match status {
            400..=499 => bump(&self.proxy_client_error),
            500.. => bump(&self.proxy_error),
            _ => bump(&self.proxy_success),
        }
    }

    /// A forwarded request got no answer (the store is unreachable).
    pub fn proxy_error(&self) {
        bump(&self.proxy_error);
    }

    pub fn cache_hit(&self) {
        bump(&self.cache_hit);
    }

    pub fn cache_miss(&self) {
        bump(&self.cache_miss);
    }

    pub fn renewed(&self) {
        bump(&self.renewals);
    }

    /// The Prometheus text exposition of every counter, and the cache's size.
    pub fn render(&self, cache_entries: usize) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters = [
            (
                "vault_agent_proxy_success",
                "Requests the store answered (2xx, 3xx) through the proxy, cache misses only.",
                get(&self.proxy_success),
            ),
            (
                "vault_agent_proxy_client_error",
                "Requests the store refused (4xx) through the proxy.",
                get(&self.proxy_client_error),
            ),
            (
                "vault_agent_proxy_error",
                "Requests through the proxy that failed at the store (5xx) or could not reach it.",
                get(&self.proxy_error),
            ),
            (
                "vault_agent_cache_hit",
                "Requests answered from the lease cache.",
                get(&self.cache_hit),
            ),
            (
                "vault_agent_cache_miss",
                "Cacheable requests that were not in the lease cache.",
                get(&self.cache_miss),
            ),
            (
                "sidekey_agent_cache_renewals",
                "Leases and tokens of the cache renewed.",
                get(&self.renewals),
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP sidekey_agent_cache_entries Responses held in the lease cache.\n# TYPE sidekey_agent_cache_entries gauge\nsidekey_agent_cache_entries {cache_entries}\n"
        ));
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
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }
}
