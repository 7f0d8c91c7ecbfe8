//! sidekey-injector: a mutating admission webhook that adds the Sidekey agent to pods annotated
//! the way the Vault Agent Injector expects. The pipeline: `annotations::parse` →
//! `mutate::build` → `mutate::to_patch` → `mutate::check_patch`, on the parts of the pod
//! `pod::PodView` reads, decided in `review` and served by `server`.

pub mod annotations;
pub mod autotls;
pub mod config;
pub mod decisions;
pub mod known;
pub mod metrics;
pub mod mutate;
pub mod namespace_watch;
pub mod namespaces;
pub mod pod;
pub mod quantity;
pub mod review;
pub mod server;
pub mod tls;
