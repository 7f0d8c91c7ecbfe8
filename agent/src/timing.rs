//! When things are renewed, as pure functions of a TTL and a jitter, and where the jitter comes
//! from: the policy the sidecar's schedule and the proxy's lease cache share. A leaf.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::SmallRng};

/// The source of the jitter that spreads renewals and retries of agents started together.
#[derive(Clone)]
pub struct Jitter(SmallRng);

impl Jitter {
    /// Seeded from the OS: what the agent uses.
    pub fn random() -> Jitter {
        Jitter(SmallRng::from_rng(&mut rand::rng()))
    }

    /// The same sequence every time: what tests use.
    pub fn seeded(seed: u64) -> Jitter {
        Jitter(SmallRng::seed_from_u64(seed))
    }

    /// A number in [0, 1).
    pub fn draw(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// When a renewal of something with `ttl` left is due: between 60 % and 70 % of the TTL, so
/// that agents started together spread out. `jitter` is in [0, 1).
pub fn renew_after(ttl: Duration, jitter: f64) -> Duration {
    ttl.mul_f64(0.6 + 0.1 * jitter.clamp(0.0, 1.0))
}

/// When a lease just obtained (or adopted) is first renewed: between a third and two thirds of
/// its TTL, so that many leases obtained together do not renew together.
pub fn first_renewal(ttl: Duration, jitter: f64) -> Duration {
    ttl.mul_f64((1.0 + jitter.clamp(0.0, 1.0)) / 3.0)
}
