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
