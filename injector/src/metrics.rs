//! Prometheus metrics of the webhook: reviews by outcome, review latency, injections and
//! denials by namespace, panicked reviews, certificate reloads and the build. Served as text on
//! GET /metrics (the HTTPS port, and the plain-HTTP metrics port when one is set). The chart's
//! PrometheusRule and Grafana dashboard query these names; tests/tests/chart.rs checks each one
//! against a running injector.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    pub namespace: String,
}

/// The values of the `outcome` label of `sidekey_injector_reviews_total`.
pub const OUTCOMES: [&str; 5] = ["injected", "skipped", "denied", "malformed", "panicked"];

pub struct Metrics {
    registry: Registry,
    pub reviews: Family<OutcomeLabel, Counter>,
    pub injections: Family<NamespaceLabel, Counter>,
    pub denials: Family<NamespaceLabel, Counter>,
    pub latency: Histogram,
    /// Reviews whose decision panicked (each answered with a denial).
    pub panics: Counter,
    /// Times the serving certificate was reloaded from disk.
    pub certificate_reloads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sidekey_injector");
        let reviews = Family::<OutcomeLabel, Counter>::default();
        let injections = Family::<NamespaceLabel, Counter>::default();
        let denials = Family::<NamespaceLabel, Counter>::default();
        // 50 µs to ~52 s: past the longest webhook timeout the API server allows (30 s), so an
        // alert can compare a quantile with the webhook's timeoutSeconds.
        let latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.00005, 2.0, 21,
        ));
        registry.register(
            "reviews",
            "Admission reviews answered, by outcome (injected, skipped, denied, malformed, panicked)",
            reviews.clone(),
        );
        registry.register(
            "injections",
            "Pods injected, by namespace",
            injections.clone(),
        );
        registry.register(
            "denials",
            "Pods denied for invalid annotations, by namespace",
            denials.clone(),
        );
        registry.register(
            "review_duration_seconds",
            "Time to decide one review",
            latency.clone(),
        );
        let panics = Counter::default();
        registry.register(
            "review_panics",
            "Reviews whose decision panicked, each answered with a denial (a bug: please report it)",
            panics.clone(),
        );
        let certificate_reloads = Counter::default();
        registry.register(
            "certificate_reloads",
            "Times the serving certificate was reloaded after its files changed",
            certificate_reloads.clone(),
        );
        registry.register(
            "build",
            "The running injector's version",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        // Every outcome is exported from the start, at zero, so that an alert on increase() sees
        // the first denial or panic, not just the second.
        for outcome in OUTCOMES {
            let _ = reviews.get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            });
        }
        Metrics {
            registry,
            panics,
            certificate_reloads,
            reviews,
            injections,
            denials,
            latency,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    pub fn count(&self, outcome: &str) {
        self.reviews
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}
