//! The sidecar's deadlines, pure: one per duty (the token, each lease, the static re-read, each
//! replaced credential waiting out its overlap), where a grant or a failure places the next one,
//! and which comes first. No clock is read here: every call is given `now`, and randomness comes
//! from a [`Jitter`] the caller owns (seeded in tests).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::render::SecretKey;
use crate::state::Replaced;

pub use crate::timing::{Jitter, first_renewal, renew_after};

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Duty {
    RenewToken,
    Relogin,
    RenewLease(SecretKey),
    /// Fetch a new secret in place of this one (its lease cannot be extended further).
    Rotate(SecretKey),
    RefreshStatic,
    /// Revoke something replaced earlier, once the overlap is over (its number in the
    /// schedule).
    Revoke(u64),
}

/// What the store granted for a lease: its id, the seconds it has left, the increment asked
/// for (its first TTL) and whether it can be renewed.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    pub lease_id: String,
    pub ttl: u64,
    pub asked: u64,
    pub renewable: bool,
}

impl Granted {
    /// A lease just obtained: the increment asked at each renewal is its first TTL.
    pub fn new(lease_id: String, ttl: u64, renewable: bool) -> Granted {
        Granted {
            lease_id,
            ttl,
            asked: ttl,
            renewable,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct LeaseClock {
    lease_id: String,
    /// The increment asked for at each renewal: the lease's first TTL.
    asked: u64,
    due: Instant,
    rotate: bool,
    attempt: u32,
}

/// Every deadline the sidecar keeps.
#[derive(Debug, Default, Clone)]
pub struct Schedule {
    token: Option<(Instant, Duty)>,
    token_attempt: u32,
    leases: BTreeMap<SecretKey, LeaseClock>,
    statics: Option<Instant>,
    static_attempt: u32,
    /// What waits out its overlap, by a number that is never reused: an entry leaves when it
    /// is taken for revocation, so the map holds only what is still alive.
    retired: BTreeMap<u64, (Instant, Replaced)>,
    next_retired: u64,
}

impl Schedule {
    /// The earliest deadline and its duty; `None` when there is nothing to do.
    pub fn next(&self) -> Option<(Instant, Duty)> {
        let mut best: Option<(Instant, Duty)> = self.token.clone();
        let mut consider = |at: Instant, duty: Duty| {
            if best.as_ref().is_none_or(|(b, _)| at < *b) {
                best = Some((at, duty));
            }
        };
        for (key, clock) in &self.leases {
            let duty = if clock.rotate {
                Duty::Rotate(key.clone())
            } else {
                Duty::RenewLease(key.clone())
            };
            consider(clock.due, duty);
        }
        if let Some(at) = self.statics {
            consider(at, Duty::RefreshStatic);
        }
        for (i, (at, _)) in &self.retired {
            consider(*at, Duty::Revoke(*i));
        }
        best
    }

    /// Plans the token's next step after a login or renewal that granted `ttl` seconds.
    pub fn token_granted(
        &mut self,
        now: Instant,
        ttl: u64,
        asked: u64,
        renewable: bool,
        jitter: f64,
    ) {
        self.token_attempt = 0;
        self.token = if ttl == 0 {
            None // A token without expiry (a root token) needs nothing.
        } else {
            let at = now + renew_after(Duration::from_secs(ttl), jitter);
            // Granted less than asked: the token's max TTL is near; log in again in time.
            let duty = if renewable && ttl >= asked {
                Duty::RenewToken
            } else {
                Duty::Relogin
            };
            Some((at, duty))
        };
    }

    /// The token step failed: try `duty` again after a backoff that grows with each failure.
    pub fn token_failed(&mut self, now: Instant, backoff: Backoff, jitter: f64, duty: Duty) {
        let wait = backoff.delay(self.token_attempt, jitter);
        self.token_attempt += 1;
        self.token = Some((now + wait, duty));
    }

    /// Plans a lease's next step after it was renewed.
    pub fn lease_granted(&mut self, now: Instant, key: SecretKey, grant: Granted, jitter: f64) {
        let at = now + renew_after(Duration::from_secs(grant.ttl.max(1)), jitter);
        self.plan_lease(key, grant, at);
    }

    /// Plans a lease just obtained (or adopted), see [`first_renewal`].
    pub fn lease_obtained(&mut self, now: Instant, key: SecretKey, grant: Granted, jitter: f64) {
        let at = now + first_renewal(Duration::from_secs(grant.ttl.max(1)), jitter);
        self.plan_lease(key, grant, at);
    }

    fn plan_lease(&mut self, key: SecretKey, grant: Granted, due: Instant) {
        let rotate = !grant.renewable || grant.ttl < grant.asked;
        self.leases.insert(
            key,
            LeaseClock {
                lease_id: grant.lease_id,
                asked: grant.asked,
                due,
                rotate,
                attempt: 0,
            },
        );
    }

    /// Every lease is replaced by `leases` (all obtained now, under a new token). Nothing else
    /// changes: the token is planned by its own grant, the static re-read keeps its time, and
    /// what waits out an overlap is still revoked at the end of it.
    pub fn leases_replaced(
        &mut self,
        now: Instant,
        leases: Vec<(SecretKey, Granted)>,
        jitter: &mut Jitter,
    ) {
        self.leases.clear();
        for (key, grant) in leases {
            self.lease_obtained(now, key, grant, jitter.draw());
        }
    }

    /// The lease step failed: try again (renew, or `rotate`) after a growing backoff.
    pub fn lease_failed(
        &mut self,
        now: Instant,
        key: &SecretKey,
        backoff: Backoff,
        jitter: f64,
        rotate: bool,
    ) {
        if let Some(clock) = self.leases.get_mut(key) {
            clock.due = now + backoff.delay(clock.attempt, jitter);
            clock.attempt += 1;
            clock.rotate = rotate;
        }
    }

    /// Replace this lease as soon as possible.
    pub fn rotate_now(&mut self, now: Instant, key: &SecretKey) {
        if let Some(clock) = self.leases.get_mut(key) {
            clock.due = now;
            clock.rotate = true;
        }
    }

    pub fn forget_lease(&mut self, key: &SecretKey) {
        self.leases.remove(key);
    }

    /// The lease held for `key`: its id and the increment asked at each renewal.
    pub fn lease(&self, key: &SecretKey) -> Option<(&str, u64)> {
        self.leases.get(key).map(|c| (c.lease_id.as_str(), c.asked))
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The longest first TTL of the leases held (0 without any).
    pub fn longest_lease(&self) -> u64 {
        self.leases.values().map(|c| c.asked).max().unwrap_or(0)
    }

    /// The static re-read is next due at `at` (`None`: never).
    pub fn statics_at(&mut self, at: Option<Instant>) {
        self.static_attempt = 0;
        self.statics = at;
    }

    pub fn statics_failed(&mut self, now: Instant, backoff: Backoff, jitter: f64) {
        let wait = backoff.delay(self.static_attempt, jitter);
        self.static_attempt += 1;
        self.statics = Some(now + wait);
    }

    /// Keeps `what` alive until `at`, then revokes it.
    pub fn retire(&mut self, at: Instant, what: Replaced) {
        self.retired.insert(self.next_retired, (at, what));
        self.next_retired += 1;
    }

    pub fn take_retired(&mut self, index: u64) -> Option<Replaced> {
        self.retired.remove(&index).map(|(_, r)| r)
    }

    /// Everything retired but not yet revoked (revoked at shutdown).
    pub fn drain_retired(&mut self) -> Vec<Replaced> {
        std::mem::take(&mut self.retired)
            .into_values()
            .map(|(_, r)| r)
            .collect()
    }

    /// What waits for its revocation, in the order it was retired.
    pub fn retired(&self) -> impl Iterator<Item = &Replaced> {
        self.retired.values().map(|(_, r)| r)
    }

    /// How many retired credentials still wait for their revocation.
    pub fn retired_count(&self) -> usize {
        self.retired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str) -> SecretKey {
        SecretKey::read(p)
    }

    fn grant(id: &str, ttl: u64, asked: u64) -> Granted {
        Granted {
            lease_id: id.into(),
            ttl,
            asked,
            renewable: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_renews_between_a_third_and_two_thirds_of_its_ttl() {
        let now = Instant::now();
        let mut s = Schedule::default();
        s.lease_obtained(now, key("a"), grant("a", 60, 60), 0.0);
        assert_eq!(s.next().unwrap().0, now + Duration::from_secs(20));
        s.lease_obtained(now, key("a"), grant("a", 60, 60), 1.0);
        assert_eq!(s.next().unwrap().0, now + Duration::from_secs(40));
    }

    #[test]
    fn renewals_fall_between_60_and_70_percent_of_the_ttl() {
        let ttl = Duration::from_secs(600);
        assert_eq!(renew_after(ttl, 0.0), Duration::from_secs(360));
        assert_eq!(renew_after(ttl, 0.5), Duration::from_secs(390));
        assert_eq!(renew_after(ttl, 1.0), Duration::from_secs(420));
        // Out-of-range jitter is clamped, never placing a renewal past 70 %.
        assert_eq!(renew_after(ttl, 7.0), Duration::from_secs(420));
        assert_eq!(renew_after(ttl, -1.0), Duration::from_secs(360));
        let mut jitter = Jitter::seeded(7);
        let draws: Vec<f64> = (0..1000).map(|_| jitter.draw()).collect();
        assert!(draws.iter().all(|j| (0.0..1.0).contains(j)));
    }

    /// A day of rotations and logins retires tens of thousands of credentials; once revoked,
    /// none of them may stay behind in the schedule (every wake scans what is there).
    #[tokio::test(start_paused = true)]
    async fn a_revoked_credential_leaves_the_schedule() {
        let mut s = Schedule::default();
        let now = Instant::now();
        for n in 0..10_000u64 {
            s.retire(now, Replaced::Lease(format!("l{n}")));
            let Some((_, Duty::Revoke(i))) = s.next() else {
                panic!("the retired lease is due")
            };
            assert_eq!(s.take_retired(i), Some(Replaced::Lease(format!("l{n}"))));
            assert_eq!(s.retired_count(), 0, "after {n} revocations");
        }
        // Numbers are never reused: taking an old one again takes nothing.
        s.retire(now, Replaced::Lease("last".into()));
        assert_eq!(s.take_retired(0), None);
        assert_eq!(s.retired_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_earliest_duty_comes_first() {
        let now = Instant::now();
        let mut s = Schedule::default();
        assert_eq!(s.next(), None);
        s.token_granted(now, 600, 600, true, 0.0);
        let db = key("database/creds/app");
        s.lease_granted(now, db.clone(), grant("l1", 60, 60), 0.0);
        s.statics_at(Some(now + Duration::from_secs(300)));
        assert_eq!(
            s.next(),
            Some((now + Duration::from_secs(36), Duty::RenewLease(db.clone())))
        );
        tokio::time::advance(Duration::from_secs(36)).await;
        // Renewed with less than asked: replace it rather than let it run out.
        let later = Instant::now();
        s.lease_granted(later, db.clone(), grant("l1", 10, 60), 0.0);
        assert_eq!(s.next().unwrap().1, Duty::Rotate(db.clone()));
        s.rotate_now(later, &db);
        assert_eq!(s.next(), Some((later, Duty::Rotate(db.clone()))));
        s.forget_lease(&db);
        assert_eq!(
            s.next(),
            Some((now + Duration::from_secs(300), Duty::RefreshStatic))
        );
        s.retire(now + Duration::from_secs(40), Replaced::Lease("old".into()));
        assert_eq!(
            s.next(),
            Some((now + Duration::from_secs(40), Duty::Revoke(0)))
        );
        assert_eq!(s.take_retired(0), Some(Replaced::Lease("old".into())));
        assert_eq!(s.take_retired(0), None);
        assert_eq!(s.retired_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_token_is_replaced_by_a_login() {
        let now = Instant::now();
        let mut s = Schedule::default();
        s.token_granted(now, 100, 600, true, 0.5);
        assert_eq!(
            s.next(),
            Some((now + Duration::from_secs(65), Duty::Relogin))
        );
        s.token_granted(now, 600, 600, false, 0.5);
        assert_eq!(
            s.next().unwrap().1,
            Duty::Relogin,
            "a token that cannot be renewed is replaced"
        );
        s.token_granted(now, 0, 0, false, 0.5);
        assert_eq!(s.next(), None, "a token without expiry needs nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_growing_and_capped_then_a_grant_resets_them() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut s = Schedule::default();
        s.token_granted(Instant::now(), 600, 600, true, 0.3);
        let mut waits = Vec::new();
        for _ in 0..8 {
            let now = Instant::now();
            s.token_failed(now, backoff, 1.0, Duty::RenewToken);
            let (at, duty) = s.next().unwrap();
            assert_eq!(duty, Duty::RenewToken);
            waits.push((at - now).as_millis());
            tokio::time::advance(at - now).await;
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        let now = Instant::now();
        s.token_granted(now, 600, 600, true, 0.0);
        s.token_failed(now, backoff, 1.0, Duty::RenewToken);
        assert_eq!(s.next().unwrap().0 - now, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn hours_of_renewals_of_leases_obtained_together_stay_spread() {
        // An hour of renewals of 500 leases with a 60 s TTL, all obtained at once, with a fixed
        // seed: the first renewals spread over 20-40 s, every later one lands 36-42 s after the
        // previous one, and no second of the second half hour sees more than three times the
        // mean rate.
        let mut jitter = Jitter::seeded(42);
        let mut s = Schedule::default();
        let t0 = Instant::now();
        let mut last = std::collections::HashMap::new();
        for i in 0..500 {
            let k = key(&format!("database/creds/r{i}"));
            s.lease_obtained(t0, k.clone(), grant("l", 60, 60), jitter.draw());
            last.insert(k, t0);
        }
        let mut per_second = std::collections::HashMap::<u64, u32>::new();
        let mut renewals = 0;
        while let Some((at, Duty::RenewLease(k))) = s.next() {
            if at - t0 > Duration::from_secs(3600) {
                break;
            }
            let gap = at - last[&k];
            let first = last[&k] == t0;
            let (lo, hi) = if first { (20, 40) } else { (36, 42) };
            assert!(
                gap >= Duration::from_secs(lo) && gap <= Duration::from_secs(hi),
                "{gap:?}"
            );
            last.insert(k.clone(), at);
            let second = (at - t0).as_secs();
            if second >= 1800 {
                *per_second.entry(second).or_default() += 1;
                renewals += 1;
            }
            s.lease_granted(at, k, grant("l", 60, 60), jitter.draw());
        }
        let mean = renewals as f64 / 1800.0;
        let peak = *per_second.values().max().unwrap() as f64;
        assert!(renewals > 20_000, "{renewals}");
        assert!(peak <= 3.0 * mean, "peak {peak}/s vs mean {mean}/s");
    }
}
