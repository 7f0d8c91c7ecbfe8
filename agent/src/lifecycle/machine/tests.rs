//! The machine's decisions under tokio's paused clock: hours of a sidecar's life run in
//! milliseconds, with a seeded jitter, so every test is deterministic.

use super::*;

fn key(p: &str) -> SecretKey {
    SecretKey::read(p)
}

fn policy(revoke_on_shutdown: bool) -> Policy {
    Policy {
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        static_interval: Duration::from_secs(300),
        revoke_on_shutdown,
    }
}

fn db() -> SecretKey {
    key("database/creds/app")
}

/// A sidecar holding a 1 h token and one 60 s database lease.
fn machine(revoke_on_shutdown: bool) -> Machine {
    Machine::new(
        Instant::now(),
        policy(revoke_on_shutdown),
        Jitter::seeded(1),
        TokenGrant {
            ttl: 3600,
            asked: 3600,
            renewable: true,
        },
        vec![(db(), Granted::new("lease-1".into(), 60, true))],
    )
}

/// Sleeps (paused clock) until the machine's next wake-up and ticks.
async fn tick(m: &mut Machine) -> Vec<Action> {
    let at = m.next_wake().expect("something is planned");
    tokio::time::sleep_until(at).await;
    m.step(Event::Tick, Instant::now())
}

fn done(m: &mut Machine, outcome: Outcome) -> Vec<Action> {
    m.step(Event::Done(outcome), Instant::now())
}

fn renew_lease_task(lease_id: &str) -> Action {
    Action::Perform(Task::RenewLease {
        key: db(),
        lease_id: lease_id.into(),
        increment: Some(60),
    })
}

fn renewed(ttl: u64) -> Outcome {
    Outcome::LeaseRenewed {
        key: db(),
        ttl,
        renewable: true,
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_is_renewed_at_its_deadline_and_planned_again() {
    let t0 = Instant::now();
    let mut m = machine(true);
    assert_eq!(
        m.step(Event::Tick, t0),
        [],
        "nothing is due before its time"
    );
    assert_eq!(tick(&mut m).await, [renew_lease_task("lease-1")]);
    let first = Instant::now() - t0;
    assert!(first >= Duration::from_secs(20) && first <= Duration::from_secs(40));
    assert_eq!(m.next_wake(), None, "no wake-up while a task is in flight");
    assert_eq!(m.step(Event::Tick, Instant::now()), []);
    let renewed_at = Instant::now();
    assert_eq!(done(&mut m, renewed(60)), []);
    let next = m.next_wake().unwrap() - renewed_at;
    assert!(next >= Duration::from_secs(36) && next <= Duration::from_secs(42));
}

#[tokio::test(start_paused = true)]
async fn sigterm_cancels_the_renewal_in_flight_and_revokes() {
    let mut m = machine(true);
    assert_eq!(tick(&mut m).await, [renew_lease_task("lease-1")]);
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [
            Action::Cancel,
            Action::Shutdown {
                revoke: true,
                replaced: vec![]
            }
        ]
    );
    // The cancelled renewal's outcome, or anything else, changes nothing any more.
    for event in [
        Event::Done(renewed(60)),
        Event::Tick,
        Event::Stop,
        Event::PreStopRevoked,
        Event::CredentialRotated,
    ] {
        assert_eq!(m.step(event, Instant::now()), []);
    }
    assert_eq!(m.next_wake(), None);
}

#[tokio::test(start_paused = true)]
async fn sigterm_with_revoke_on_shutdown_off_revokes_nothing() {
    let mut m = machine(false);
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [Action::Shutdown {
            revoke: false,
            replaced: vec![]
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_complete_prestop_revocation_sigterm_just_exits() {
    let mut m = machine(true);
    assert_eq!(tick(&mut m).await, [renew_lease_task("lease-1")]);
    assert_eq!(
        m.step(Event::PreStopRevoked, Instant::now()),
        [Action::Cancel, Action::Hold { revoked: true }]
    );
    assert_eq!(m.next_wake(), None, "nothing is renewed any more");
    assert_eq!(m.step(Event::CredentialRotated, Instant::now()), []);
    assert_eq!(
        m.step(Event::PreStopIncomplete, Instant::now()),
        [],
        "a revocation recorded stays recorded"
    );
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [Action::Exit { replaced: vec![] }]
    );
}

#[tokio::test(start_paused = true)]
async fn after_an_incomplete_prestop_revocation_sigterm_revokes_again() {
    let mut m = machine(true);
    assert_eq!(
        m.step(Event::PreStopIncomplete, Instant::now()),
        [Action::Hold { revoked: false }]
    );
    assert_eq!(m.next_wake(), None);
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [Action::Shutdown {
            revoke: true,
            replaced: vec![]
        }]
    );
}

/// A lease renewed with less than asked is replaced at once; the old one is revoked after 75 %
/// of what it had left, and a shutdown before then revokes it too.
#[tokio::test(start_paused = true)]
async fn a_lease_at_its_max_ttl_is_rotated_and_the_old_one_revoked_after_the_overlap() {
    let mut m = machine(true);
    tick(&mut m).await;
    assert_eq!(
        done(&mut m, renewed(20)),
        [Action::Perform(Task::Rotate { key: db() })]
    );
    let rotated_at = Instant::now();
    let new = Granted::new("lease-2".into(), 60, true);
    assert_eq!(
        done(
            &mut m,
            Outcome::Rotated {
                key: db(),
                new: Some(new),
                old: Some(("lease-1".into(), 20)),
            }
        ),
        []
    );
    // The new lease's first renewal (20-40 s) may come first; the old one is revoked at 15 s.
    assert_eq!(
        tick(&mut m).await,
        [Action::Perform(Task::Revoke(Replaced::Lease(
            "lease-1".into()
        )))]
    );
    assert_eq!(Instant::now() - rotated_at, Duration::from_secs(15));
    assert_eq!(done(&mut m, Outcome::ReplacedRevoked), []);
    assert_eq!(tick(&mut m).await, [renew_lease_task("lease-2")]);

    // Rotated again, then stopped inside the overlap: the old lease goes with the shutdown.
    done(&mut m, renewed(10));
    done(
        &mut m,
        Outcome::Rotated {
            key: db(),
            new: Some(Granted::new("lease-3".into(), 60, true)),
            old: Some(("lease-2".into(), 10)),
        },
    );
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [Action::Shutdown {
            revoke: true,
            replaced: vec![Replaced::Lease("lease-2".into())]
        }]
    );
}

/// A login replaces the token and every lease, and keeps what was already planned: the old
/// lease still waiting for its revocation, and the static re-read's time.
#[tokio::test(start_paused = true)]
async fn a_new_login_keeps_pending_revocations_and_the_static_schedule() {
    let t0 = Instant::now();
    let mut m = machine(true);
    tick(&mut m).await;
    done(&mut m, renewed(20));
    done(
        &mut m,
        Outcome::Rotated {
            key: db(),
            new: Some(Granted::new("lease-2".into(), 60, true)),
            old: Some(("lease-1".into(), 40)),
        },
    );
    // The token renewal is refused (say, revoked from outside): a new login at once.
    let revoke_old_at = Instant::now() + Duration::from_secs(30);
    m.in_flight = Some(InFlight::Duty(Duty::RenewToken));
    assert_eq!(
        done(&mut m, Outcome::Failed(Failure::Refused)),
        [Action::Perform(Task::Login)]
    );
    let old_token = Token::new("old");
    assert_eq!(
        done(
            &mut m,
            Outcome::LoggedIn {
                ttl: 3600,
                renewable: true,
                leases: vec![(db(), Granted::new("lease-new".into(), 60, true))],
                replaced: Some(old_token.clone()),
            }
        ),
        []
    );
    let logged_in = Instant::now();
    // In order: the old token after its overlap (half the longest lease: 30 s), the old lease
    // at its own time, the new lease's renewal, and the static re-read at t0 + 300 s.
    let mut seen = Vec::new();
    while let Some(at) = m.next_wake() {
        if at > t0 + Duration::from_secs(300) {
            break;
        }
        let mut actions = tick(&mut m).await;
        // A task's outcome may start the next one due at the same time.
        while let Some(Action::Perform(task)) = actions.first().cloned() {
            seen.push((Instant::now(), task.clone()));
            let outcome = match task {
                Task::Revoke(_) => Outcome::ReplacedRevoked,
                Task::RenewLease { .. } => renewed(60),
                Task::RefreshStatics => Outcome::StaticsRefreshed,
                other => panic!("unexpected {other:?}"),
            };
            actions = done(&mut m, outcome);
        }
        assert_eq!(actions, []);
    }
    let at = |t: &Task| seen.iter().find(|(_, s)| s == t).map(|(at, _)| *at);
    assert_eq!(
        at(&Task::Revoke(Replaced::Token(old_token))),
        Some(logged_in + Duration::from_secs(30))
    );
    assert_eq!(
        at(&Task::Revoke(Replaced::Lease("lease-1".into()))),
        Some(revoke_old_at)
    );
    assert_eq!(
        at(&Task::RefreshStatics),
        Some(t0 + Duration::from_secs(300))
    );
    assert!(seen.iter().any(|(_, t)| t
        == &Task::RenewLease {
            key: db(),
            lease_id: "lease-new".into(),
            increment: Some(60)
        }));
}

#[tokio::test(start_paused = true)]
async fn a_denied_renewal_checks_the_token_before_deciding() {
    // A dead token: log in again.
    let mut m = machine(true);
    tick(&mut m).await;
    assert_eq!(
        done(&mut m, Outcome::Failed(Failure::Denied)),
        [Action::Perform(Task::CheckToken)]
    );
    assert_eq!(
        done(&mut m, Outcome::TokenChecked { alive: Some(false) }),
        [Action::Perform(Task::Login)]
    );

    // A live token: only the lease is gone; fetch a new secret.
    let mut m = machine(true);
    tick(&mut m).await;
    done(&mut m, Outcome::Failed(Failure::Denied));
    assert_eq!(
        done(&mut m, Outcome::TokenChecked { alive: Some(true) }),
        [Action::Perform(Task::Rotate { key: db() })]
    );

    // The store cannot say: retry the renewal after a backoff, never log in on a guess.
    let mut m = machine(true);
    tick(&mut m).await;
    done(&mut m, Outcome::Failed(Failure::Denied));
    let now = Instant::now();
    assert_eq!(done(&mut m, Outcome::TokenChecked { alive: None }), []);
    assert!(m.next_wake().unwrap() - now <= Duration::from_secs(5));
    assert_eq!(tick(&mut m).await, [renew_lease_task("lease-1")]);

    // Any other refusal (the lease was revoked): a new secret at once.
    let mut m = machine(true);
    tick(&mut m).await;
    assert_eq!(
        done(&mut m, Outcome::Failed(Failure::Refused)),
        [Action::Perform(Task::Rotate { key: db() })]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_back_off_growing_and_capped() {
    let mut m = machine(true);
    tick(&mut m).await;
    let mut waits = Vec::new();
    for _ in 0..10 {
        let failed_at = Instant::now();
        assert_eq!(done(&mut m, Outcome::Failed(Failure::Transient)), []);
        assert_eq!(tick(&mut m).await, [renew_lease_task("lease-1")]);
        waits.push(Instant::now() - failed_at);
    }
    assert!(
        waits.iter().all(|w| *w <= Duration::from_secs(5)),
        "{waits:?}"
    );
    assert!(waits[6] > waits[0], "{waits:?}");
    // Success resets the backoff: the next renewal is at its TTL-based time.
    let now = Instant::now();
    done(&mut m, renewed(60));
    assert!(m.next_wake().unwrap() - now >= Duration::from_secs(36));
}

#[tokio::test(start_paused = true)]
async fn a_rotated_credential_is_checked_after_the_task_in_flight() {
    let mut m = machine(true);
    assert_eq!(
        m.step(Event::CredentialRotated, Instant::now()),
        [Action::Perform(Task::CheckToken)]
    );
    assert_eq!(
        done(&mut m, Outcome::TokenChecked { alive: Some(true) }),
        []
    );

    tick(&mut m).await;
    assert_eq!(m.step(Event::CredentialRotated, Instant::now()), []);
    assert_eq!(
        done(&mut m, renewed(60)),
        [Action::Perform(Task::CheckToken)]
    );
    assert_eq!(
        done(&mut m, Outcome::TokenChecked { alive: Some(false) }),
        [Action::Perform(Task::Login)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_capped_token_is_replaced_by_a_login_and_statics_are_reread() {
    let t0 = Instant::now();
    let mut m = Machine::new(
        t0,
        policy(true),
        Jitter::seeded(3),
        TokenGrant {
            ttl: 100,
            asked: 100,
            renewable: true,
        },
        vec![],
    );
    assert_eq!(
        tick(&mut m).await,
        [Action::Perform(Task::RenewToken {
            increment: Some(100)
        })]
    );
    // Granted less than asked: the token's max TTL is near; the next step is a login.
    assert_eq!(
        done(
            &mut m,
            Outcome::TokenRenewed {
                ttl: 50,
                renewable: true
            }
        ),
        []
    );
    assert_eq!(tick(&mut m).await, [Action::Perform(Task::Login)]);
    done(
        &mut m,
        Outcome::LoggedIn {
            ttl: 1000,
            renewable: true,
            leases: vec![],
            replaced: None,
        },
    );
    assert_eq!(tick(&mut m).await, [Action::Perform(Task::RefreshStatics)]);
    assert_eq!(Instant::now() - t0, Duration::from_secs(300));
    // A denied re-read with a live token waits for the next interval.
    done(&mut m, Outcome::Failed(Failure::Denied));
    assert_eq!(
        done(&mut m, Outcome::TokenChecked { alive: Some(true) }),
        []
    );
    assert_eq!(
        m.next_wake(),
        Some(Instant::now() + Duration::from_secs(300))
    );
}

/// Every event in every phase: at most one task is ever in flight, nothing starts after a stop,
/// and a stop always ends in exactly one shutdown or exit.
#[tokio::test(start_paused = true)]
async fn every_event_in_every_phase_keeps_the_invariants() {
    let outcomes = || {
        vec![
            Outcome::TokenRenewed {
                ttl: 3600,
                renewable: true,
            },
            Outcome::LoggedIn {
                ttl: 3600,
                renewable: true,
                leases: vec![(db(), Granted::new("l9".into(), 60, true))],
                replaced: Some(Token::new("t")),
            },
            renewed(60),
            renewed(5),
            Outcome::Rotated {
                key: db(),
                new: None,
                old: Some(("l1".into(), 60)),
            },
            Outcome::StaticsRefreshed,
            Outcome::TokenChecked { alive: Some(true) },
            Outcome::TokenChecked { alive: Some(false) },
            Outcome::TokenChecked { alive: None },
            Outcome::ReplacedRevoked,
            Outcome::Failed(Failure::Transient),
            Outcome::Failed(Failure::Denied),
            Outcome::Failed(Failure::Refused),
        ]
    };
    let mut events = vec![
        Event::Tick,
        Event::Stop,
        Event::PreStopRevoked,
        Event::PreStopIncomplete,
        Event::CredentialRotated,
    ];
    events.extend(outcomes().into_iter().map(Event::Done));
    // Two events in every order, from an idle machine and from one with a task in flight.
    for in_flight in [false, true] {
        for first in &events {
            for second in &events {
                let mut m = machine(true);
                if in_flight {
                    tick(&mut m).await;
                }
                let mut busy = in_flight;
                let mut ended = 0;
                for event in [first.clone(), second.clone()] {
                    let was_stopped = m.phase == Phase::Stopped;
                    let is_done = matches!(event, Event::Done(_));
                    let actions = m.step(event.clone(), Instant::now());
                    let performs = actions
                        .iter()
                        .filter(|a| matches!(a, Action::Perform(_)))
                        .count();
                    let cancels = actions.contains(&Action::Cancel);
                    if was_stopped {
                        assert_eq!(actions, [], "{first:?} then {second:?}");
                    }
                    if cancels {
                        assert!(
                            busy,
                            "a cancel with nothing in flight: {first:?} then {second:?}"
                        );
                        busy = false;
                    }
                    if is_done && busy {
                        busy = false;
                    }
                    assert!(performs <= 1, "{actions:?}");
                    if performs == 1 {
                        assert!(
                            !busy,
                            "a second task while one is in flight: {first:?} then {second:?}"
                        );
                        busy = true;
                    }
                    assert_eq!(busy, m.in_flight.is_some(), "{first:?} then {second:?}");
                    ended += actions
                        .iter()
                        .filter(|a| matches!(a, Action::Shutdown { .. } | Action::Exit { .. }))
                        .count();
                    if event == Event::Stop && !was_stopped {
                        assert_eq!(m.phase, Phase::Stopped);
                        assert_eq!(m.next_wake(), None);
                    }
                }
                let stopped = [first, second].contains(&&Event::Stop);
                assert_eq!(ended, usize::from(stopped), "{first:?} then {second:?}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_adopted_token_that_aged_is_renewed_not_replaced() {
    // Saved with 6 s, 5 s left at adoption: renewed (asking 6 s), not taken for a capped grant.
    let mut m = Machine::new(
        Instant::now(),
        policy(true),
        Jitter::seeded(5),
        TokenGrant {
            ttl: 5,
            asked: 6,
            renewable: true,
        },
        vec![],
    );
    assert_eq!(
        tick(&mut m).await,
        [Action::Perform(Task::RenewToken { increment: Some(6) })]
    );
}

#[tokio::test(start_paused = true)]
async fn a_revocation_dropped_in_flight_is_revoked_at_shutdown() {
    let mut m = machine(true);
    tick(&mut m).await;
    done(&mut m, renewed(20));
    done(
        &mut m,
        Outcome::Rotated {
            key: db(),
            new: Some(Granted::new("lease-2".into(), 60, true)),
            old: Some(("lease-1".into(), 20)),
        },
    );
    assert_eq!(
        tick(&mut m).await,
        [Action::Perform(Task::Revoke(Replaced::Lease(
            "lease-1".into()
        )))]
    );
    // SIGTERM while the revocation is on the wire: it may never have reached the store.
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [
            Action::Cancel,
            Action::Shutdown {
                revoke: true,
                replaced: vec![Replaced::Lease("lease-1".into())]
            }
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn what_a_stopped_task_obtained_is_revoked_and_what_a_finished_one_obtained_is_kept() {
    let new_token = Replaced::Token(Token::new("new"));
    // Stopped after the login returned, before the outcome: the new token is revoked.
    let mut m = machine(true);
    m.step(Event::CredentialRotated, Instant::now());
    done(&mut m, Outcome::TokenChecked { alive: Some(false) });
    assert_eq!(
        m.step(Event::Obtained(new_token.clone()), Instant::now()),
        []
    );
    assert_eq!(
        m.outstanding(),
        std::slice::from_ref(&new_token),
        "saved for the hook"
    );
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [
            Action::Cancel,
            Action::Shutdown {
                revoke: true,
                replaced: vec![new_token.clone()]
            }
        ]
    );
    // Cancelled by the preStop hook's record: SIGTERM's exit still revokes it (unless the
    // hook's record covers it, which the driver checks).
    let mut m = machine(true);
    m.step(Event::CredentialRotated, Instant::now());
    done(&mut m, Outcome::TokenChecked { alive: Some(false) });
    m.step(Event::Obtained(new_token.clone()), Instant::now());
    m.step(Event::PreStopRevoked, Instant::now());
    assert_eq!(
        m.step(Event::Stop, Instant::now()),
        [Action::Exit {
            replaced: vec![new_token.clone()]
        }]
    );
    // The login finished: the token is the driver's now, not the machine's.
    let mut m = machine(true);
    m.step(Event::CredentialRotated, Instant::now());
    done(&mut m, Outcome::TokenChecked { alive: Some(false) });
    m.step(Event::Obtained(new_token), Instant::now());
    done(
        &mut m,
        Outcome::LoggedIn {
            ttl: 3600,
            renewable: true,
            leases: vec![],
            replaced: None,
        },
    );
    assert_eq!(m.outstanding(), []);
}

#[tokio::test(start_paused = true)]
async fn a_login_the_store_refuses_gives_up_instead_of_retrying_forever() {
    let mut m = machine(true);
    m.step(Event::CredentialRotated, Instant::now());
    assert_eq!(
        done(&mut m, Outcome::TokenChecked { alive: Some(false) }),
        [Action::Perform(Task::Login)]
    );
    // A store that cannot answer: retried.
    assert_eq!(done(&mut m, Outcome::Failed(Failure::Transient)), []);
    assert_eq!(tick(&mut m).await, [Action::Perform(Task::Login)]);
    // A deleted role: the sidecar stops, revoking what it holds, with the error.
    assert_eq!(
        done(&mut m, Outcome::Failed(Failure::Refused)),
        [Action::GiveUp {
            revoke: true,
            replaced: vec![]
        }]
    );
    assert_eq!(m.next_wake(), None);
    assert_eq!(m.step(Event::Stop, Instant::now()), []);
}

#[test]
fn retired_credentials_do_not_accumulate() {
    let mut m = machine(true);
    let mut now = Instant::now();
    for n in 0..2_000u32 {
        now += Duration::from_secs(3600);
        // Whatever is due, done; a rotation each round.
        let mut actions = m.step(Event::Tick, now);
        while let Some(Action::Perform(task)) = actions.first().cloned() {
            let outcome = match task {
                Task::RenewLease { .. } => renewed(5),
                Task::Rotate { key } => Outcome::Rotated {
                    key,
                    new: Some(Granted::new(format!("l{n}"), 60, true)),
                    old: Some((format!("old{n}"), 60)),
                },
                Task::RenewToken { .. } => Outcome::TokenRenewed {
                    ttl: 3600,
                    renewable: true,
                },
                Task::Revoke(_) => Outcome::ReplacedRevoked,
                Task::RefreshStatics => Outcome::StaticsRefreshed,
                other => panic!("unexpected {other:?}"),
            };
            actions = m.step(Event::Done(outcome), now);
        }
    }
    assert!(m.retired_count() <= 2, "{} retired", m.retired_count());
}

/// Every event at every await point of every task, generated: a model of the driver performs
/// the machine's tasks against a model of the store, one await at a time, and any event may
/// land between two awaits. Whatever the interleaving, once the sidecar has stopped nothing
/// the agent ever obtained is alive in the store.
mod interleavings {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Choice {
        Tick,
        Stop,
        PreStopRevoked,
        PreStopIncomplete,
        CredentialRotated,
        /// The task in flight passes its next await, the way numbered.
        Advance(u8),
    }

    const CHOICES: [Choice; 9] = [
        Choice::Tick,
        Choice::Stop,
        Choice::PreStopRevoked,
        Choice::PreStopIncomplete,
        Choice::CredentialRotated,
        Choice::Advance(0),
        Choice::Advance(1),
        Choice::Advance(2),
        Choice::Advance(3),
    ];

    /// The driver (what it holds, the task in flight and how far it got) and the store.
    #[derive(Clone)]
    struct Sim {
        m: Machine,
        now: Instant,
        ids: u32,
        /// Alive in the store; a lease dies with the token that created it.
        alive: BTreeSet<String>,
        parent: BTreeMap<String, String>,
        token: String,
        lease: Option<String>,
        task: Option<(Task, u8)>,
        /// What the task obtained that the machine has not been told of (the driver's ledger).
        obtained: Vec<Replaced>,
        /// What the preStop hook's record covers.
        covered: Option<BTreeSet<String>>,
        /// A login's new token, and the lease fetched under it, before the commit.
        login: Option<(String, Option<String>)>,
        /// A rotation's new lease and the one it replaces, between fetch and outcome.
        rotated: Option<(String, Option<String>)>,
        ended: bool,
        trace: Vec<String>,
    }

    fn name(r: &Replaced) -> String {
        match r {
            Replaced::Token(t) => t.expose().to_string(),
            Replaced::Lease(l) => l.clone(),
        }
    }

    impl Sim {
        fn new() -> Sim {
            // Short times, so that every duty comes due within a few ticks.
            let m = Machine::new(
                Instant::now(),
                Policy {
                    static_interval: Duration::from_secs(25),
                    ..policy(true)
                },
                Jitter::seeded(3),
                TokenGrant {
                    ttl: 30,
                    asked: 30,
                    renewable: true,
                },
                vec![(db(), Granted::new("lease-1".into(), 60, true))],
            );
            let mut sim = Sim {
                m,
                now: Instant::now(),
                ids: 1,
                alive: BTreeSet::new(),
                parent: BTreeMap::new(),
                token: "t0".into(),
                lease: Some("lease-1".into()),
                task: None,
                obtained: Vec::new(),
                covered: None,
                login: None,
                rotated: None,
                ended: false,
                trace: Vec::new(),
            };
            sim.alive.insert("t0".into());
            sim.alive.insert("lease-1".into());
            sim.parent.insert("lease-1".into(), "t0".into());
            sim
        }

        fn fresh(&mut self, kind: &str) -> String {
            self.ids += 1;
            let id = format!("{kind}{}", self.ids);
            self.alive.insert(id.clone());
            id
        }

        fn revoke(&mut self, what: &str) {
            self.alive.remove(what);
            let children: Vec<String> = self
                .parent
                .iter()
                .filter(|(_, t)| t.as_str() == what)
                .map(|(l, _)| l.clone())
                .collect();
            for l in children {
                self.alive.remove(&l);
            }
        }

        /// What the driver holds: its token and lease.
        fn held(&self) -> Vec<String> {
            let mut all = vec![self.token.clone()];
            all.extend(self.lease.clone());
            all
        }

        /// The driver's `tell`: the ledger first, then the event.
        fn step(&mut self, event: Event) {
            for what in std::mem::take(&mut self.obtained) {
                assert_eq!(self.m.step(Event::Obtained(what), self.now), []);
            }
            self.trace.push(format!("{event:?}"));
            let actions = self.m.step(event, self.now);
            for action in actions {
                self.act(action);
            }
        }

        fn act(&mut self, action: Action) {
            match action {
                Action::Perform(task) => {
                    assert!(self.task.is_none(), "two tasks: {:?}", self.trace);
                    self.task = Some((task, 0));
                }
                Action::Cancel => self.task = None,
                Action::Hold { .. } => {}
                Action::Shutdown { revoke, replaced } | Action::GiveUp { revoke, replaced } => {
                    assert!(revoke);
                    for what in self.held() {
                        self.revoke(&what);
                    }
                    for r in replaced {
                        self.revoke(&name(&r));
                    }
                    self.ended = true;
                }
                Action::Exit { replaced } => {
                    let covered = self.covered.clone().expect("exit after a complete hook");
                    let mut rest = self.held();
                    rest.extend(replaced.iter().map(name));
                    for what in rest {
                        if !covered.contains(&what) {
                            self.revoke(&what);
                        }
                    }
                    self.ended = true;
                }
            }
        }

        fn done(&mut self, outcome: Outcome) {
            self.task = None;
            self.step(Event::Done(outcome));
        }

        /// The task in flight passes its next await (`way` picks among its outcomes).
        fn advance(&mut self, way: u8) -> bool {
            let Some((task, point)) = self.task.clone() else {
                return false;
            };
            let pick = |n: u8| way % n;
            match (task, point) {
                (Task::Login, 0) => match pick(3) {
                    0 => {
                        let t = self.fresh("t");
                        self.obtained.push(Replaced::Token(Token::new(t.clone())));
                        self.task = Some((Task::Login, 1));
                        self.trace.push(format!("login -> {t}"));
                        self.login = Some((t, None));
                    }
                    1 => self.done(Outcome::Failed(Failure::Transient)),
                    _ => self.done(Outcome::Failed(Failure::Refused)),
                },
                (Task::Login, 1) => {
                    // The lease under the new token, created as the fetch returns (it dies
                    // with its token, so the driver does not report it).
                    let (t, _) = self.login.take().expect("logged in");
                    let l = self.fresh("l");
                    self.parent.insert(l.clone(), t.clone());
                    self.task = Some((Task::Login, 2));
                    self.trace.push(format!("fetched {l} -> render"));
                    self.login = Some((t, Some(l)));
                }
                (Task::Login, _) => {
                    let (t, l) = self.login.take().expect("fetched");
                    let l = l.expect("fetched");
                    let old = std::mem::replace(&mut self.token, t);
                    self.lease = Some(l.clone());
                    self.obtained.push(Replaced::Token(Token::new(old.clone())));
                    self.done(Outcome::LoggedIn {
                        ttl: 3600,
                        renewable: true,
                        leases: vec![(db(), Granted::new(l, 60, true))],
                        replaced: Some(Token::new(old)),
                    });
                }
                (Task::Rotate { key }, 0) => match pick(3) {
                    0 => {
                        let l = self.fresh("l");
                        self.parent.insert(l.clone(), self.token.clone());
                        self.obtained.push(Replaced::Lease(l.clone()));
                        let old = self.lease.replace(l.clone());
                        if let Some(old) = &old {
                            self.obtained.push(Replaced::Lease(old.clone()));
                        }
                        self.task = Some((Task::Rotate { key }, 1));
                        self.trace
                            .push(format!("rotated {l} for {old:?} -> render"));
                        self.rotated = Some((l, old));
                    }
                    1 => self.done(Outcome::Failed(Failure::Transient)),
                    _ => self.done(Outcome::Failed(Failure::Denied)),
                },
                (Task::Rotate { key }, _) => {
                    let (new, old) = self.rotated.take().expect("fetched");
                    self.done(Outcome::Rotated {
                        key,
                        new: Some(Granted::new(new, 60, true)),
                        old: old.map(|o| (o, 60)),
                    });
                }
                (Task::RenewLease { .. }, _) => self.done(match pick(4) {
                    0 => renewed(60),
                    1 => renewed(5),
                    2 => Outcome::Failed(Failure::Denied),
                    _ => Outcome::Failed(Failure::Refused),
                }),
                (Task::RenewToken { .. }, _) => self.done(match pick(4) {
                    0 => Outcome::TokenRenewed {
                        ttl: 3600,
                        renewable: true,
                    },
                    1 => Outcome::Failed(Failure::Transient),
                    2 => Outcome::Failed(Failure::Refused),
                    _ => Outcome::TokenRenewed {
                        ttl: 50,
                        renewable: true,
                    },
                }),
                (Task::CheckToken, _) => self.done(Outcome::TokenChecked {
                    alive: [Some(true), Some(false), None][usize::from(pick(3))],
                }),
                (Task::RefreshStatics, _) => self.done(match pick(2) {
                    0 => Outcome::StaticsRefreshed,
                    _ => Outcome::Failed(Failure::Denied),
                }),
                (Task::Revoke(what), _) => {
                    self.revoke(&name(&what));
                    self.done(Outcome::ReplacedRevoked);
                }
            }
            true
        }

        /// Plays `choice`; false when it does not apply (nothing to advance or due).
        fn play(&mut self, choice: Choice) -> bool {
            if self.ended {
                return false;
            }
            match choice {
                Choice::Advance(way) => return self.advance(way),
                Choice::Tick => match self.m.next_wake() {
                    Some(at) => {
                        self.now = self.now.max(at);
                        self.step(Event::Tick);
                    }
                    None => return false,
                },
                Choice::Stop => self.step(Event::Stop),
                Choice::PreStopRevoked => {
                    // The hook revokes what the state file holds: the driver's credentials,
                    // the machine's outstanding ones and the task's (saved as obtained).
                    let mut covered: BTreeSet<String> = self.held().into_iter().collect();
                    covered.extend(self.m.outstanding().iter().map(name));
                    covered.extend(self.obtained.iter().map(name));
                    for what in covered.clone() {
                        self.revoke(&what);
                    }
                    self.covered
                        .get_or_insert_with(BTreeSet::new)
                        .extend(covered);
                    self.step(Event::PreStopRevoked);
                }
                Choice::PreStopIncomplete => self.step(Event::PreStopIncomplete),
                Choice::CredentialRotated => self.step(Event::CredentialRotated),
            }
            true
        }

        /// What tells two states apart, roughly: the search visits each once.
        fn signature(&self) -> String {
            format!(
                "{:?} {} {:?} {:?} {:?} {:?} {} {}",
                self.task,
                self.token,
                self.lease,
                self.m.next_wake().map(|w| w - self.now),
                self.m.outstanding(),
                self.obtained,
                self.covered.is_some(),
                self.alive.len(),
            )
        }

        fn what(&self) -> Option<(String, u8)> {
            self.task.as_ref().map(|(t, p)| {
                let kind = format!("{t:?}");
                (
                    kind.split([' ', '(', '{']).next().unwrap_or("").to_string(),
                    *p,
                )
            })
        }

        /// SIGTERM if the sidecar still runs; then nothing the agent obtained may be alive.
        fn finish_and_check(mut self) {
            if !self.ended {
                self.step(Event::Stop);
            }
            assert!(self.ended, "{:?}", self.trace);
            assert!(
                self.alive.is_empty(),
                "left alive: {:?} after {:?}",
                self.alive,
                self.trace
            );
        }
    }

    #[test]
    fn every_event_at_every_await_of_every_task_leaves_nothing_alive() {
        // Every (task, await point) the machine can reach, by the shortest way there.
        let mut reached: BTreeMap<(String, u8), Sim> = BTreeMap::new();
        let mut frontier = vec![Sim::new()];
        let mut seen = BTreeSet::new();
        for _depth in 0..14 {
            let mut next = Vec::new();
            for sim in &frontier {
                for choice in CHOICES {
                    let mut s = sim.clone();
                    if !s.play(choice) || s.ended || !seen.insert(s.signature()) {
                        continue;
                    }
                    if let Some(at) = s.what() {
                        reached.entry(at).or_insert_with(|| s.clone());
                    }
                    next.push(s);
                }
            }
            frontier = next;
        }
        let kinds: BTreeSet<&str> = reached.keys().map(|(k, _)| k.as_str()).collect();
        for kind in [
            "RenewToken",
            "Login",
            "RenewLease",
            "Rotate",
            "RefreshStatics",
            "CheckToken",
            "Revoke",
        ] {
            assert!(kinds.contains(kind), "{kind} never in flight: {kinds:?}");
        }
        assert!(reached.contains_key(&("Login".into(), 2)));
        assert!(reached.contains_key(&("Rotate".into(), 1)));
        // From each, every sequence of three choices, then SIGTERM.
        let mut runs = 0;
        let mut starts: Vec<Sim> = reached.into_values().collect();
        starts.push(Sim::new());
        for start in starts {
            for a in CHOICES {
                for b in CHOICES {
                    for c in CHOICES {
                        let mut s = start.clone();
                        for choice in [a, b, c] {
                            s.play(choice);
                        }
                        s.finish_and_check();
                        runs += 1;
                    }
                }
            }
        }
        assert!(runs > 5_000, "{runs}");
    }
}
