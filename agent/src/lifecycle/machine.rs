//! The sidecar's decisions, sans I/O: [`Machine::step`] takes an event (a deadline passed, the
//! outcome of the task in flight, SIGTERM, the preStop hook's record, a rotated credential) and
//! the time, and says what to do next. Every decision lives here: when to renew, rotate or log
//! in again, how long a replaced credential overlaps its successor, when to revoke it, what a
//! refusal means, and how the sidecar stops. At most one task is in flight at a time; the
//! driver runs it, and cancels it when told to.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::client::Token;
use crate::render::SecretKey;
use crate::state::Replaced;

use super::schedule::{Duty, Granted, Jitter, Schedule};

/// The shortest and longest overlap of a replaced token with its successor.
const TOKEN_OVERLAP: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(60));
/// The part of a replaced lease's TTL it is kept alive for, so the app can move over.
const LEASE_OVERLAP: f64 = 0.75;

/// What the sidecar is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Time passed: start whatever is due.
    Tick,
    /// The task in flight finished.
    Done(Outcome),
    /// SIGTERM (or any other request to stop): the one way the sidecar is stopped.
    Stop,
    /// The preStop hook recorded that it revoked everything.
    PreStopRevoked,
    /// The preStop hook recorded that it could not revoke everything.
    PreStopIncomplete,
    /// The credential file changed (the kubelet rotated the projected token).
    CredentialRotated,
    /// The task in flight obtained a credential (a login's token, a new secret's lease) that
    /// its outcome has not reported yet. The driver says so before its next await, so a task
    /// stopped at any await leaves nothing unaccounted for: until the outcome commits it, the
    /// machine keeps it and revokes it if the task never ends.
    Obtained(Replaced),
}

/// Why a request failed, as far as deciding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// May pass by itself (unreachable, 5xx, 429).
    Transient,
    /// 403: a dead token, or a policy that changed.
    Denied,
    /// Any other refusal. For a login: one that cannot pass by itself (a deleted role, a
    /// policy that refuses it), told by the error's type, never its text.
    Refused,
}

/// How the task in flight ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    TokenRenewed {
        ttl: u64,
        renewable: bool,
    },
    /// A new login; every leased secret was fetched again under it (`leases`) and the files
    /// rendered. `replaced` is the previous token when it was ours and differs.
    LoggedIn {
        ttl: u64,
        renewable: bool,
        leases: Vec<(SecretKey, Granted)>,
        replaced: Option<Token>,
    },
    LeaseRenewed {
        key: SecretKey,
        ttl: u64,
        renewable: bool,
    },
    /// A new secret in place of the old one (rendered); `new` is its lease, `old` the lease it
    /// replaced with that lease's TTL.
    Rotated {
        key: SecretKey,
        new: Option<Granted>,
        old: Option<(String, u64)>,
    },
    StaticsRefreshed,
    /// `None`: the store could not say.
    TokenChecked {
        alive: Option<bool>,
    },
    /// A replaced credential was revoked, or could not be (it expires at its TTL).
    ReplacedRevoked,
    Failed(Failure),
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Perform(Task),
    /// Drop the task in flight.
    Cancel,
    /// Renew nothing more and wait for SIGTERM (`revoked`: the preStop hook did it all).
    Hold {
        revoked: bool,
    },
    /// Revoke everything held (with `replaced`) when `revoke`, then exit.
    Shutdown {
        revoke: bool,
        replaced: Vec<Replaced>,
    },
    /// Exit without revoking what the preStop hook revoked; `replaced` (credentials retired,
    /// or obtained by a task that never finished) are revoked unless the hook's record covers
    /// them.
    Exit {
        replaced: Vec<Replaced>,
    },
    /// The store refuses every login: revoke everything held (with `replaced`) when `revoke`,
    /// then exit with the login's error, so the pod shows it (restarts) instead of an agent
    /// that retries forever.
    GiveUp {
        revoke: bool,
        replaced: Vec<Replaced>,
    },
}

/// One piece of I/O.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    RenewToken {
        increment: Option<u64>,
    },
    Login,
    RenewLease {
        key: SecretKey,
        lease_id: String,
        increment: Option<u64>,
    },
    /// Fetch `key` afresh, render, save.
    Rotate {
        key: SecretKey,
    },
    /// Re-read every secret without a lease; render and save when one changed.
    RefreshStatics,
    CheckToken,
    Revoke(Replaced),
}

/// What the task in flight is for, so its outcome can be placed.
#[derive(Debug, Clone, PartialEq)]
enum InFlight {
    Duty(Duty),
    /// A token check, and what it decides.
    Check(Check),
    /// A replaced credential being revoked: back to the schedule if the task is dropped.
    Revoke(Replaced),
}

#[derive(Debug, Clone, PartialEq)]
enum Check {
    /// After a 403 renewing this lease: a live token means the lease alone is gone.
    LeaseDenied(SecretKey),
    /// After a 403 fetching a new secret for this lease.
    RotateDenied(SecretKey),
    /// After a 403 re-reading static secrets.
    StaticsDenied,
    /// The credential file rotated.
    Credential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// The preStop hook ran; `revoked`: it revoked everything.
    Holding {
        revoked: bool,
    },
    Stopped,
}

/// The rules the decisions follow, from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub backoff: Backoff,
    pub static_interval: Duration,
    pub revoke_on_shutdown: bool,
}

/// The token as the machine knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenGrant {
    pub ttl: u64,
    /// The increment asked at each renewal (the token's first TTL).
    pub asked: u64,
    pub renewable: bool,
}

#[derive(Clone)]
pub struct Machine {
    schedule: Schedule,
    policy: Policy,
    jitter: Jitter,
    token_asked: u64,
    phase: Phase,
    in_flight: Option<InFlight>,
    /// What the task in flight obtained and its outcome has not reported yet.
    provisional: Vec<Replaced>,
    credential_rotated: bool,
}

fn increment(asked: u64) -> Option<u64> {
    (asked > 0).then_some(asked)
}

impl Machine {
    /// A sidecar that holds `token` and `leases` (just obtained or adopted) at `now`.
    pub fn new(
        now: Instant,
        policy: Policy,
        mut jitter: Jitter,
        token: TokenGrant,
        leases: Vec<(SecretKey, Granted)>,
    ) -> Machine {
        let mut schedule = Schedule::default();
        // An adopted token has aged: what it has left is not a capped grant.
        let planned = token.asked.min(token.ttl.max(1));
        schedule.token_granted(now, token.ttl, planned, token.renewable, jitter.draw());
        schedule.leases_replaced(now, leases, &mut jitter);
        schedule.statics_at(Some(now + policy.static_interval));
        Machine {
            schedule,
            policy,
            jitter,
            token_asked: token.asked,
            phase: Phase::Running,
            in_flight: None,
            provisional: Vec::new(),
            credential_rotated: false,
        }
    }

    /// When the driver should next send [`Event::Tick`]: `None` while a task is in flight,
    /// once stopping, or when nothing is planned.
    pub fn next_wake(&self) -> Option<Instant> {
        match (self.phase, &self.in_flight) {
            (Phase::Running, None) => self.schedule.next().map(|(at, _)| at),
            _ => None,
        }
    }

    /// Whether the sidecar still renews (no preStop record, no stop): the proxy's cached
    /// leases are renewed only then, as the agent's own are.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    pub fn lease_count(&self) -> usize {
        self.schedule.lease_count()
    }

    /// Every credential the machine still has to revoke: those waiting out their overlap, the
    /// one being revoked, and what the task in flight obtained. The driver saves them with the
    /// state, so the preStop hook revokes them too.
    pub fn outstanding(&self) -> Vec<Replaced> {
        let mut all: Vec<Replaced> = self.schedule.retired().cloned().collect();
        if let Some(InFlight::Revoke(r)) = &self.in_flight {
            all.push(r.clone());
        }
        all.extend(self.provisional.iter().cloned());
        all
    }

    /// How many replaced credentials wait for their revocation (bounded by what is alive).
    pub fn retired_count(&self) -> usize {
        self.schedule.retired_count()
    }

    /// The increment asked at each token renewal (what the state file records as its TTL).
    pub fn token_asked(&self) -> u64 {
        self.token_asked
    }

    /// Decides what `event` at `now` calls for.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        if self.phase == Phase::Stopped {
            return Vec::new();
        }
        match event {
            Event::Stop => self.stop(now),
            Event::Obtained(what) => {
                if self.in_flight.is_some() {
                    self.provisional.push(what);
                } else {
                    // Nothing will report it: revoke it at the next chance.
                    self.schedule.retire(now, what);
                }
                Vec::new()
            }
            Event::PreStopRevoked | Event::PreStopIncomplete => {
                let revoked = event == Event::PreStopRevoked;
                match self.phase {
                    // Once everything is revoked, a later record cannot undo it.
                    Phase::Holding { revoked: true } => Vec::new(),
                    _ => {
                        self.phase = Phase::Holding { revoked };
                        let mut actions = self.cancel(now);
                        actions.push(Action::Hold { revoked });
                        actions
                    }
                }
            }
            _ if self.phase != Phase::Running => Vec::new(),
            Event::CredentialRotated => {
                if self.in_flight.is_some() {
                    self.credential_rotated = true;
                    Vec::new()
                } else {
                    self.start(InFlight::Check(Check::Credential))
                }
            }
            Event::Tick => {
                if self.in_flight.is_some() {
                    return Vec::new();
                }
                self.start_due(now)
            }
            Event::Done(outcome) => {
                let Some(in_flight) = self.in_flight.take() else {
                    return Vec::new(); // An outcome nobody waits for (cancelled meanwhile).
                };
                let provisional = std::mem::take(&mut self.provisional);
                if matches!(outcome, Outcome::Failed(_)) {
                    // The task kept nothing it obtained: revoke it now.
                    for what in provisional {
                        self.schedule.retire(now, what);
                    }
                }
                if let (InFlight::Duty(Duty::Relogin), Outcome::Failed(Failure::Refused)) =
                    (&in_flight, &outcome)
                {
                    return self.give_up();
                }
                if let Some(next) = self.place(in_flight, outcome, now) {
                    return self.start(next);
                }
                if std::mem::take(&mut self.credential_rotated) {
                    return self.start(InFlight::Check(Check::Credential));
                }
                self.start_due(now)
            }
        }
    }

    fn stop(&mut self, now: Instant) -> Vec<Action> {
        let phase = std::mem::replace(&mut self.phase, Phase::Stopped);
        let mut actions = self.cancel(now);
        let replaced = self.schedule.drain_retired();
        actions.push(match phase {
            Phase::Holding { revoked: true } => Action::Exit { replaced },
            _ => Action::Shutdown {
                revoke: self.policy.revoke_on_shutdown,
                replaced,
            },
        });
        actions
    }

    /// A login the store will never accept: stop as SIGTERM would, but with an error.
    fn give_up(&mut self) -> Vec<Action> {
        self.phase = Phase::Stopped;
        vec![Action::GiveUp {
            revoke: self.policy.revoke_on_shutdown,
            replaced: self.schedule.drain_retired(),
        }]
    }

    /// Drops the task in flight; what it obtained, or was revoking, is revoked at once.
    fn cancel(&mut self, now: Instant) -> Vec<Action> {
        self.credential_rotated = false;
        let in_flight = self.in_flight.take();
        for what in std::mem::take(&mut self.provisional) {
            self.schedule.retire(now, what);
        }
        match in_flight {
            Some(InFlight::Revoke(what)) => {
                self.schedule.retire(now, what);
                vec![Action::Cancel]
            }
            Some(_) => vec![Action::Cancel],
            None => Vec::new(),
        }
    }

    /// Starts the earliest duty if it is due.
    fn start_due(&mut self, now: Instant) -> Vec<Action> {
        match self.schedule.next() {
            Some((at, duty)) if at <= now => self.start(InFlight::Duty(duty)),
            _ => Vec::new(),
        }
    }

    fn start(&mut self, what: InFlight) -> Vec<Action> {
        let (what, task) = match what {
            InFlight::Duty(Duty::Revoke(i)) => match self.schedule.take_retired(i) {
                Some(r) => (InFlight::Revoke(r.clone()), Task::Revoke(r)),
                None => return Vec::new(),
            },
            what => match self.task_for(&what) {
                Some(task) => (what, task),
                None => return Vec::new(),
            },
        };
        self.in_flight = Some(what);
        vec![Action::Perform(task)]
    }

    fn task_for(&self, what: &InFlight) -> Option<Task> {
        Some(match what {
            InFlight::Check(_) => Task::CheckToken,
            InFlight::Revoke(r) => Task::Revoke(r.clone()),
            InFlight::Duty(duty) => match duty {
                Duty::RenewToken => Task::RenewToken {
                    increment: increment(self.token_asked),
                },
                Duty::Relogin => Task::Login,
                Duty::RenewLease(key) => match self.schedule.lease(key) {
                    Some((lease_id, asked)) => Task::RenewLease {
                        key: key.clone(),
                        lease_id: lease_id.to_string(),
                        increment: increment(asked),
                    },
                    None => return None,
                },
                Duty::Rotate(key) => Task::Rotate { key: key.clone() },
                Duty::RefreshStatic => Task::RefreshStatics,
                Duty::Revoke(_) => return None, // Taken from the schedule by `start`.
            },
        })
    }

    /// Plans after `outcome` of `what`; returns a follow-up to start at once.
    fn place(&mut self, what: InFlight, outcome: Outcome, now: Instant) -> Option<InFlight> {
        let backoff = self.policy.backoff;
        let j = self.jitter.draw();
        match (what, outcome) {
            (InFlight::Duty(Duty::RenewToken), Outcome::TokenRenewed { ttl, renewable }) => {
                let asked = self.token_asked;
                self.schedule.token_granted(now, ttl, asked, renewable, j);
                None
            }
            (InFlight::Duty(Duty::RenewToken), Outcome::Failed(Failure::Transient)) => {
                self.schedule
                    .token_failed(now, backoff, j, Duty::RenewToken);
                None
            }
            // The store will not renew it: a new login.
            (InFlight::Duty(Duty::RenewToken), Outcome::Failed(_)) => {
                Some(InFlight::Duty(Duty::Relogin))
            }
            (
                InFlight::Duty(Duty::Relogin),
                Outcome::LoggedIn {
                    ttl,
                    renewable,
                    leases,
                    replaced,
                },
            ) => {
                // The old token (and every lease it created) stays for the app to move over:
                // half the longest lease it held, within bounds.
                let overlap = Duration::from_secs(self.schedule.longest_lease() / 2)
                    .clamp(TOKEN_OVERLAP.0, TOKEN_OVERLAP.1);
                self.token_asked = ttl;
                self.schedule.token_granted(now, ttl, ttl, renewable, j);
                self.schedule.leases_replaced(now, leases, &mut self.jitter);
                if let Some(old) = replaced {
                    self.schedule.retire(now + overlap, Replaced::Token(old));
                }
                None
            }
            (InFlight::Duty(Duty::Relogin), _) => {
                self.schedule.token_failed(now, backoff, j, Duty::Relogin);
                None
            }
            (
                InFlight::Duty(Duty::RenewLease(key)),
                Outcome::LeaseRenewed {
                    key: renewed,
                    ttl,
                    renewable,
                },
            ) if renewed == key => {
                let (lease_id, asked) = self.schedule.lease(&key)?;
                let grant = Granted {
                    lease_id: lease_id.to_string(),
                    ttl,
                    asked,
                    renewable,
                };
                self.schedule.lease_granted(now, key.clone(), grant, j);
                // Granted less than asked: its max TTL is near. Replace it now, while it still
                // has `ttl` seconds for the app to move over.
                (ttl < asked).then_some(InFlight::Duty(Duty::Rotate(key)))
            }
            (InFlight::Duty(Duty::RenewLease(key)), Outcome::Failed(Failure::Transient)) => {
                self.schedule.lease_failed(now, &key, backoff, j, false);
                None
            }
            (InFlight::Duty(Duty::RenewLease(key)), Outcome::Failed(Failure::Denied)) => {
                Some(InFlight::Check(Check::LeaseDenied(key)))
            }
            // Refused (the lease was revoked, say): a new secret.
            (InFlight::Duty(Duty::RenewLease(key)), _) => Some(InFlight::Duty(Duty::Rotate(key))),
            (
                InFlight::Duty(Duty::Rotate(key)),
                Outcome::Rotated {
                    key: rotated,
                    new,
                    old,
                },
            ) if rotated == key => {
                match new {
                    Some(grant) => self.schedule.lease_obtained(now, key, grant, j),
                    None => self.schedule.forget_lease(&key),
                }
                if let Some((lease_id, ttl)) = old {
                    let overlap = Duration::from_secs(ttl).mul_f64(LEASE_OVERLAP);
                    self.schedule
                        .retire(now + overlap, Replaced::Lease(lease_id));
                }
                None
            }
            (InFlight::Duty(Duty::Rotate(key)), Outcome::Failed(Failure::Denied)) => {
                Some(InFlight::Check(Check::RotateDenied(key)))
            }
            (InFlight::Duty(Duty::Rotate(key)), _) => {
                self.schedule.lease_failed(now, &key, backoff, j, true);
                None
            }
            (InFlight::Duty(Duty::RefreshStatic), Outcome::Failed(Failure::Transient)) => {
                self.schedule.statics_failed(now, backoff, j);
                None
            }
            (InFlight::Duty(Duty::RefreshStatic), Outcome::Failed(Failure::Denied)) => {
                Some(InFlight::Check(Check::StaticsDenied))
            }
            (InFlight::Duty(Duty::RefreshStatic), _) => {
                self.plan_statics(now);
                None
            }
            (InFlight::Revoke(_) | InFlight::Duty(Duty::Revoke(_)), _) => None,
            (InFlight::Check(check), Outcome::TokenChecked { alive }) => match (check, alive) {
                (_, Some(false)) => Some(InFlight::Duty(Duty::Relogin)),
                (Check::Credential, _) => None,
                (Check::LeaseDenied(key), Some(true)) => Some(InFlight::Duty(Duty::Rotate(key))),
                (Check::LeaseDenied(key), None) => {
                    self.schedule.lease_failed(now, &key, backoff, j, false);
                    None
                }
                (Check::RotateDenied(key), _) => {
                    self.schedule.lease_failed(now, &key, backoff, j, true);
                    None
                }
                (Check::StaticsDenied, Some(true)) => {
                    self.plan_statics(now);
                    None
                }
                (Check::StaticsDenied, None) => {
                    self.schedule.statics_failed(now, backoff, j);
                    None
                }
            },
            // An outcome that does not fit the task (a driver bug): retry the duty later
            // rather than drop it.
            (what, outcome) => {
                tracing::warn!(?what, ?outcome, "an outcome that does not fit its task");
                if let InFlight::Duty(duty) = what {
                    self.retry_later(now, duty, j);
                }
                None
            }
        }
    }

    fn plan_statics(&mut self, now: Instant) {
        self.schedule
            .statics_at(Some(now + self.policy.static_interval));
    }

    fn retry_later(&mut self, now: Instant, duty: Duty, j: f64) {
        let backoff = self.policy.backoff;
        match duty {
            Duty::RenewToken | Duty::Relogin => self.schedule.token_failed(now, backoff, j, duty),
            Duty::RenewLease(key) => self.schedule.lease_failed(now, &key, backoff, j, false),
            Duty::Rotate(key) => self.schedule.lease_failed(now, &key, backoff, j, true),
            Duty::RefreshStatic => self.schedule.statics_failed(now, backoff, j),
            Duty::Revoke(_) => {}
        }
    }
}

#[cfg(test)]
mod tests;
