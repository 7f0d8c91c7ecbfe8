//! The sidecar: adopts the init container's token and leases (or logs in and renders itself),
//! renews the token and every lease at about two thirds of its TTL with jitter, replaces a lease
//! the store will not extend any further, re-reads static secrets every render interval, rides out
//! store outages, and revokes everything when the pod stops.
//!
//! This module alone owns time, in three layers: `schedule` (the deadlines, pure), `machine`
//! (every decision, a pure function of state, event and time that returns actions), and
//! `driver` (the I/O those actions call for, the one task in flight, and the one way to stop).
//! `inputs` turns signals and file changes into the driver's events.

mod driver;
mod inputs;
pub mod machine;
pub mod schedule;

use crate::config::AgentConfig;
use crate::revoke;
use crate::start::RunError;

pub use driver::Sidecar;
pub use inputs::{Control, Input};

/// Written to the state folder once every file has been rendered (the native-sidecar startup
/// probe runs `sidekey-agent ready`, which checks it).
pub const READY_FILE: &str = "ready";

/// `sidekey-agent sidecar`: runs until SIGTERM, or until `revoke` marks the state revoked.
pub async fn sidecar(config: &AgentConfig) -> Result<(), RunError> {
    Sidecar::new(config).run().await
}

/// `sidekey-agent guard`: waits for SIGTERM, which the kubelet sends a native sidecar only after
/// the app containers have exited (so a Job completes first), then revokes what the init
/// container saved, leases first and then the token. Nothing is renewed or rendered meanwhile:
/// the pod reads files that were rendered once, and a lease that expires first needs no revoking.
pub async fn guard(config: &AgentConfig) -> Result<(), RunError> {
    let mut inputs = inputs::Inputs::signals();
    tracing::info!("holding the init container's token and leases until the pod stops");
    // The signal handlers are in place; nothing but the wait runs until the pod stops, so the
    // start-up code's pages can go.
    if let Err(e) = crate::memory::release_code_pages() {
        tracing::debug!(error = %e, "cannot page out start-up code");
    }
    inputs.stopped().await;
    let report = revoke::revoke_saved(config, revoke::StopClock::begin(config)).await?;
    tracing::info!(%report, "pod stopped");
    Ok(())
}

/// `sidekey-agent ready`: whether the first render is done (for a startup probe).
pub fn is_ready(config: &AgentConfig) -> bool {
    config.state_dir.join(READY_FILE).exists()
}
