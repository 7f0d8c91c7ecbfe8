//! The sidecar: adopts the init container's token and leases (or logs in and renders itself),
//! renews the token and every lease at about two thirds of its TTL with jitter, replaces a lease
//! the store will not extend any further, re-reads static secrets every render interval, rides out
//! store outages, and revokes everything when the pod stops.
//!
//! This module alone owns time. Its decisions are pure: `Schedule` holds one deadline per duty
//! and `Schedule::next` says which comes first; `renew_after` places a renewal inside a TTL. The
//! loop sleeps until the next deadline, does that one duty, and asks again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::{self, Session};
use crate::backoff::Backoff;
use crate::client::{StoreClient, Token};
use crate::config::AgentConfig;
use crate::cycle::{self, Template};
use crate::fetch::Fetcher;
use crate::render::SecretKey;
use crate::run::{self, RunError, backoff, retry_until, state_of};
use crate::state::{self, State};

/// Written to the state folder once every file has been rendered (the native-sidecar startup
/// probe runs `sidekey-agent ready`, which checks it).
pub const READY_FILE: &str = "ready";

/// When a renewal of something with `ttl` left is due: between 60 % and 70 % of the TTL, so
/// that agents started together spread out. `jitter` is in [0, 1).
pub fn renew_after(ttl: Duration, jitter: f64) -> Duration {
    ttl.mul_f64(0.6 + 0.1 * jitter.clamp(0.0, 1.0))
}

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Duty {
    RenewToken,
    Relogin,
    RenewLease(SecretKey),
    /// Fetch a new secret in place of this one (its lease cannot be extended further).
    Rotate(SecretKey),
    RefreshStatic,
    /// Revoke something replaced earlier, once the overlap is over.
    Revoke(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Retired {
    Lease(String),
    Token(Token),
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
#[derive(Debug, Default)]
pub struct Schedule {
    token: Option<(Instant, Duty)>,
    token_attempt: u32,
    leases: BTreeMap<SecretKey, LeaseClock>,
    statics: Option<Instant>,
    static_attempt: u32,
    retired: Vec<Option<(Instant, Retired)>>,
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
        for (i, r) in self.retired.iter().enumerate() {
            if let Some((at, _)) = r {
                consider(*at, Duty::Revoke(i));
            }
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

    pub fn token_failed(&mut self, now: Instant, backoff: Backoff, duty: Duty) {
        let wait = backoff.delay_random(self.token_attempt);
        self.token_attempt += 1;
        self.token = Some((now + wait, duty));
    }

    /// Plans a lease's next step after it was obtained or renewed.
    pub fn lease_granted(&mut self, now: Instant, key: SecretKey, grant: Granted, jitter: f64) {
        let at = now + renew_after(Duration::from_secs(grant.ttl.max(1)), jitter);
        let rotate = !grant.renewable || grant.ttl < grant.asked;
        self.leases.insert(
            key,
            LeaseClock {
                lease_id: grant.lease_id,
                asked: grant.asked,
                due: at,
                rotate,
                attempt: 0,
            },
        );
    }

    /// Plans a lease just obtained (or adopted): its first renewal falls anywhere between a third
    /// and two thirds of the TTL, so that many leases obtained together do not renew together.
    pub fn lease_obtained(&mut self, now: Instant, key: SecretKey, grant: Granted, jitter: f64) {
        let first =
            Duration::from_secs(grant.ttl.max(1)).mul_f64((1.0 + jitter.clamp(0.0, 1.0)) / 3.0);
        self.lease_granted(now, key.clone(), grant, jitter);
        if let Some(clock) = self.leases.get_mut(&key) {
            clock.due = now + first;
        }
    }

    pub fn lease_failed(&mut self, now: Instant, key: &SecretKey, backoff: Backoff, rotate: bool) {
        if let Some(clock) = self.leases.get_mut(key) {
            clock.due = now + backoff.delay_random(clock.attempt);
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

    pub fn lease(&self, key: &SecretKey) -> Option<(&str, u64)> {
        self.leases.get(key).map(|c| (c.lease_id.as_str(), c.asked))
    }

    pub fn statics_at(&mut self, at: Option<Instant>) {
        self.statics = at;
    }

    pub fn retire(&mut self, at: Instant, what: Retired) {
        self.retired.push(Some((at, what)));
    }

    pub fn take_retired(&mut self, index: usize) -> Option<Retired> {
        self.retired
            .get_mut(index)
            .and_then(Option::take)
            .map(|(_, r)| r)
    }

    /// Everything retired but not yet revoked (revoked at shutdown).
    pub fn drain_retired(&mut self) -> Vec<Retired> {
        self.retired.drain(..).flatten().map(|(_, r)| r).collect()
    }
}

/// Events from outside the schedule.
#[derive(Debug)]
enum Event {
    Stop,
    StateChanged,
    CredentialChanged,
}

struct Sidecar<'a> {
    config: &'a AgentConfig,
    client: StoreClient,
    templates: Vec<Template>,
    session: Session,
    token_asked: u64,
    fetcher: Fetcher,
    schedule: Schedule,
    backoff: Backoff,
}

/// `sidekey-agent sidecar`: runs until SIGTERM, or until `revoke` marks the state revoked.
pub async fn sidecar(config: &AgentConfig) -> Result<(), RunError> {
    let templates = cycle::prepare_all(config)?;
    let client = StoreClient::new(&config.store, backoff(config))?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| state_error(&config.state_dir, e))?;
    std::fs::create_dir_all(&config.secrets_dir)
        .map_err(|e| state_error(&config.secrets_dir, e))?;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    spawn_signal_listener(events_tx.clone());
    let _watchers = watch_files(config, events_tx);

    let mut sidecar = match adopt(config, &client).await? {
        Some(sidecar) => sidecar,
        None => first_render(config, client, templates.clone()).await?,
    };
    sidecar.templates = templates;
    std::fs::write(config.state_dir.join(READY_FILE), b"")
        .map_err(|e| state_error(&config.state_dir, e))?;
    tracing::info!(leases = sidecar.schedule.leases.len(), "sidecar running");

    loop {
        let next = sidecar.schedule.next();
        let sleep = async {
            match &next {
                Some((at, _)) => tokio::time::sleep_until(*at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                let (_, duty) = next.expect("a deadline was due");
                sidecar.perform(duty).await;
            }
            event = events.recv() => match event {
                Some(Event::Stop) | None => return sidecar.stop().await,
                Some(Event::StateChanged) => {
                    if state_revoked(&config.state_dir) {
                        // Exiting here would kill the preStop hook's own process with the
                        // container (the kubelet then reports the hook as failed); the kubelet
                        // sends SIGTERM as soon as the hook returns.
                        tracing::info!("the state was revoked (preStop); renewing nothing more, waiting for SIGTERM");
                        while let Some(event) = events.recv().await {
                            if matches!(event, Event::Stop) {
                                break;
                            }
                        }
                        return Ok(());
                    }
                }
                Some(Event::CredentialChanged) => sidecar.check_token().await,
            },
        }
    }
}

fn state_error(dir: &Path, e: std::io::Error) -> RunError {
    RunError::State(state::StateError::File {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })
}

fn state_revoked(dir: &Path) -> bool {
    matches!(state::load(dir), Ok(Some(s)) if s.revoked)
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Takes over the init container's state when its token is still valid.
async fn adopt<'a>(
    config: &'a AgentConfig,
    client: &StoreClient,
) -> Result<Option<Sidecar<'a>>, RunError> {
    let saved = match state::load(&config.state_dir) {
        Ok(Some(s)) if !s.revoked => s,
        Ok(_) => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable state file; logging in afresh");
            return Ok(None);
        }
    };
    // An outage must not make us log in afresh and orphan the init container's token: retry
    // transient errors; only a token the store rejects means starting over.
    let limit = Duration::from_secs(config.lifecycle.init_timeout_secs);
    let lookup = retry_until(limit, backoff(config), "token lookup", || async {
        match client.lookup_self(&saved.token).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.is_transient() => Err(RunError::Client(e)),
            Err(e) => {
                tracing::info!(error = %e, "the init container's token is no longer valid; logging in afresh");
                Ok(None)
            }
        }
    })
    .await?;
    let Some(info) = lookup else { return Ok(None) };
    crate::sink::write_token(&config.token_sinks, &saved.token);
    let now = Instant::now();
    let session = Session {
        token: saved.token.clone(),
        accessor: saved.accessor.clone(),
        ttl_secs: info.ttl,
        renewable: info.renewable,
        owned: saved.token_owned,
    };
    let mut fetcher = Fetcher::new(client.clone(), saved.token.clone());
    let mut schedule = Schedule::default();
    let unix_now = state::now_secs();
    for held in &saved.secrets {
        fetcher.adopt(held.key.clone(), held.secret.clone());
        if !held.secret.lease_id.is_empty() {
            let age = unix_now.saturating_sub(held.renewed_at);
            let left = held.secret.lease_duration.saturating_sub(age);
            schedule.lease_obtained(
                now,
                held.key.clone(),
                Granted {
                    lease_id: held.secret.lease_id.clone(),
                    ttl: left,
                    asked: left,
                    renewable: held.secret.renewable,
                },
                jitter(),
            );
        }
    }
    schedule.token_granted(
        now,
        info.ttl,
        saved.token_ttl_secs.min(info.ttl.max(1)),
        info.renewable,
        jitter(),
    );
    schedule.statics_at(Some(
        now + Duration::from_secs(config.lifecycle.static_secret_render_interval_secs),
    ));
    tracing::info!(accessor = %saved.accessor, leases = saved.lease_ids().count(), "adopted the init container's token and leases");
    Ok(Some(Sidecar {
        config,
        client: client.clone(),
        templates: Vec::new(),
        token_asked: saved.token_ttl_secs.max(info.ttl),
        session,
        fetcher,
        schedule,
        backoff: backoff(config),
    }))
}

/// No usable init state (native sidecar, pre-populate off, or an expired token): do the init
/// container's work here.
async fn first_render(
    config: &AgentConfig,
    client: StoreClient,
    templates: Vec<Template>,
) -> Result<Sidecar<'_>, RunError> {
    let limit = Duration::from_secs(config.lifecycle.init_timeout_secs);
    let (session, fetcher) = retry_until(limit, backoff(config), "first render", || {
        run::first_render(config, &client, &templates, &config.secrets_dir)
    })
    .await?;
    let mut sidecar = Sidecar {
        config,
        client,
        templates,
        token_asked: session.ttl_secs,
        session,
        fetcher,
        schedule: Schedule::default(),
        backoff: backoff(config),
    };
    sidecar.plan_after_login();
    sidecar.save();
    Ok(sidecar)
}

fn increment(asked: u64) -> Option<u64> {
    (asked > 0).then_some(asked)
}

impl Sidecar<'_> {
    /// Schedules the token, every lease and the static refresh from what is held now.
    fn plan_after_login(&mut self) {
        let now = Instant::now();
        self.schedule = Schedule::default();
        self.schedule.token_granted(
            now,
            self.session.ttl_secs,
            self.token_asked,
            self.session.renewable,
            jitter(),
        );
        let held: Vec<(SecretKey, String, u64, bool)> = self
            .fetcher
            .secrets()
            .iter()
            .filter(|(_, s)| !s.lease_id.is_empty())
            .map(|(k, s)| (k.clone(), s.lease_id.clone(), s.lease_duration, s.renewable))
            .collect();
        for (key, lease_id, ttl, renewable) in held {
            self.schedule.lease_obtained(
                now,
                key,
                Granted {
                    lease_id,
                    ttl,
                    asked: ttl,
                    renewable,
                },
                jitter(),
            );
        }
        self.schedule_statics(now);
    }

    fn schedule_statics(&mut self, now: Instant) {
        self.schedule.static_attempt = 0;
        let interval =
            Duration::from_secs(self.config.lifecycle.static_secret_render_interval_secs);
        self.schedule.statics_at(Some(now + interval));
    }

    /// Saves what `revoke` and a restarted sidecar need: the token and the lease ids. Renewals
    /// change neither, so they do not save (with a thousand leases that would rewrite a large
    /// file many times a second); rotations, logins and changed static secrets do.
    fn save(&self) {
        let mut state = state_of(&self.session, &self.fetcher);
        state.token_ttl_secs = self.token_asked;
        if state_revoked(&self.config.state_dir) {
            return; // Never overwrite a revocation recorded by the preStop hook.
        }
        if let Err(e) = state::save(&self.config.state_dir, &state) {
            tracing::warn!(error = %e, "could not save the agent state");
        }
    }

    async fn render(&mut self) {
        let results =
            cycle::render_all(&self.templates, &mut self.fetcher, &self.config.secrets_dir).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::warn!(
                failed,
                "some templates could not be rendered; their previous files are kept"
            );
        }
    }

    async fn perform(&mut self, duty: Duty) {
        tracing::debug!(?duty, "due");
        match duty {
            Duty::RenewToken => self.renew_token().await,
            Duty::Relogin => self.relogin().await,
            Duty::RenewLease(key) => self.renew_lease(key).await,
            Duty::Rotate(key) => self.rotate(key).await,
            Duty::RefreshStatic => self.refresh_static().await,
            Duty::Revoke(i) => {
                if let Some(retired) = self.schedule.take_retired(i) {
                    self.revoke_retired(retired).await;
                }
            }
        }
    }

    async fn renew_token(&mut self) {
        let now = Instant::now();
        match self
            .client
            .renew_self(&self.session.token, increment(self.token_asked))
            .await
        {
            Ok(auth) => {
                self.session.ttl_secs = auth.lease_duration;
                self.session.renewable = auth.renewable;
                self.schedule.token_granted(
                    now,
                    auth.lease_duration,
                    self.token_asked,
                    auth.renewable,
                    jitter(),
                );
                tracing::info!(ttl_secs = auth.lease_duration, "token renewed");
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "token renewal failed; will retry");
                self.schedule
                    .token_failed(now, self.backoff, Duty::RenewToken);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store refused to renew the token; logging in again");
                self.relogin().await;
            }
        }
    }

    /// A new login: every leased secret is fetched again under the new token (leases die with
    /// the token that created them), files are re-rendered, and the old token is revoked after
    /// an overlap so the app can move to the new credentials.
    async fn relogin(&mut self) {
        let now = Instant::now();
        if state_revoked(&self.config.state_dir) {
            tracing::info!("the state was revoked; not logging in again");
            self.schedule = Schedule::default();
            return;
        }
        let session = match auth::login(&self.client, &self.config.auth).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "login failed; will retry");
                self.schedule.token_failed(now, self.backoff, Duty::Relogin);
                return;
            }
        };
        tracing::info!(accessor = %session.accessor, "logged in again");
        let old = std::mem::replace(&mut self.session, session);
        crate::sink::write_token(&self.config.token_sinks, &self.session.token);
        self.token_asked = self.session.ttl_secs;
        let mut fresh = Fetcher::new(self.client.clone(), self.session.token.clone());
        let mut longest_overlap = Duration::from_secs(5);
        for (key, secret) in self.fetcher.secrets() {
            if secret.lease_id.is_empty() {
                fresh.adopt(key.clone(), secret.clone());
                continue;
            }
            longest_overlap = longest_overlap.max(Duration::from_secs(secret.lease_duration) / 2);
            match fresh.fetch(key).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not fetch a secret under the new token; it is fetched at the next render")
                }
            }
        }
        self.fetcher = fresh;
        self.render().await;
        self.plan_after_login();
        let overlap = longest_overlap.min(Duration::from_secs(60));
        if old.owned && old.token != self.session.token {
            self.schedule
                .retire(now + overlap, Retired::Token(old.token));
        }
        self.save();
    }

    async fn renew_lease(&mut self, key: SecretKey) {
        let now = Instant::now();
        let Some((lease_id, asked)) = self
            .schedule
            .lease(&key)
            .map(|(id, asked)| (id.to_string(), asked))
        else {
            return;
        };
        match self
            .client
            .renew_lease(&self.session.token, &lease_id, increment(asked))
            .await
        {
            Ok(grant) => {
                let capped = grant.lease_duration < asked;
                tracing::info!(secret = %key, ttl_secs = grant.lease_duration, capped, "lease renewed");
                if let Some(secret) = self.fetcher.secrets().get(&key).cloned() {
                    let mut renewed = secret;
                    renewed.lease_duration = grant.lease_duration;
                    self.fetcher.adopt(key.clone(), renewed);
                }
                if capped {
                    // The store will not extend it any further: replace it now, while the old
                    // one still has `grant.lease_duration` seconds for the app to move over.
                    self.schedule.lease_granted(
                        now,
                        key.clone(),
                        Granted {
                            lease_id: grant.lease_id,
                            ttl: grant.lease_duration,
                            asked,
                            renewable: grant.renewable,
                        },
                        jitter(),
                    );
                    self.schedule.rotate_now(now, &key);
                } else {
                    self.schedule.lease_granted(
                        now,
                        key,
                        Granted {
                            lease_id: grant.lease_id,
                            ttl: grant.lease_duration,
                            asked,
                            renewable: grant.renewable,
                        },
                        jitter(),
                    );
                }
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(secret = %key, error = %e, "lease renewal failed; will retry");
                self.schedule.lease_failed(now, &key, self.backoff, false);
            }
            Err(e) => {
                tracing::warn!(secret = %key, error = %e, "the store refused to renew the lease; fetching a new secret");
                if e.status() == Some(403)
                    && self.client.lookup_self(&self.session.token).await.is_err()
                {
                    self.relogin().await;
                } else {
                    self.rotate(key).await;
                }
            }
        }
    }

    async fn rotate(&mut self, key: SecretKey) {
        let now = Instant::now();
        let old = self.fetcher.secrets().get(&key).cloned();
        match self.fetcher.fetch_fresh(&key).await {
            Ok(secret) => {
                tracing::info!(secret = %key, "fetched a new secret in place of one that cannot be renewed further");
                let (lease_id, ttl, renewable) = (
                    secret.lease_id.clone(),
                    secret.lease_duration,
                    secret.renewable,
                );
                self.fetcher.adopt(key.clone(), secret);
                if lease_id.is_empty() {
                    self.schedule.forget_lease(&key);
                } else {
                    self.schedule.lease_obtained(
                        now,
                        key.clone(),
                        Granted {
                            lease_id,
                            ttl,
                            asked: ttl,
                            renewable,
                        },
                        jitter(),
                    );
                }
                self.render().await;
                if let Some(old) = old.filter(|o| !o.lease_id.is_empty()) {
                    let overlap = Duration::from_secs(old.lease_duration).mul_f64(0.75);
                    self.schedule
                        .retire(now + overlap, Retired::Lease(old.lease_id));
                }
                self.save();
            }
            Err(e) => {
                tracing::warn!(secret = %key, error = %e, "could not fetch a new secret; the current file is kept");
                if e.detail.contains("403")
                    && self.client.lookup_self(&self.session.token).await.is_err()
                {
                    self.relogin().await;
                } else {
                    self.schedule.lease_failed(now, &key, self.backoff, true);
                }
            }
        }
    }

    /// Re-reads every secret without a lease (KV); files change only if their content did.
    async fn refresh_static(&mut self) {
        let now = Instant::now();
        let keys: Vec<SecretKey> = self
            .fetcher
            .secrets()
            .iter()
            .filter(|(_, s)| s.lease_id.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        let mut failed = None;
        let mut changed = false;
        for key in keys {
            match self.fetcher.fetch_fresh(&key).await {
                Ok(secret) => {
                    if self.fetcher.secrets().get(&key) != Some(&secret) {
                        changed = true;
                        self.fetcher.adopt(key, secret);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "static secret refresh failed; the current files are kept");
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            Some(e) if e.transient => {
                let wait = self.backoff.delay_random(self.schedule.static_attempt);
                self.schedule.static_attempt += 1;
                self.schedule.statics_at(Some(now + wait));
            }
            Some(e)
                if e.detail.contains("403")
                    && self.client.lookup_self(&self.session.token).await.is_err() =>
            {
                self.relogin().await;
            }
            _ => {
                if changed {
                    self.render().await;
                    self.save();
                }
                self.schedule_statics(now);
            }
        }
    }

    async fn revoke_retired(&mut self, retired: Retired) {
        let result = match &retired {
            Retired::Lease(id) => self.client.revoke_lease(&self.session.token, id).await,
            Retired::Token(token) => self.client.revoke_self(token).await,
        };
        match result {
            Ok(()) => tracing::info!(what = retired_kind(&retired), "revoked what was replaced"),
            Err(e) => {
                tracing::info!(what = retired_kind(&retired), error = %e, "could not revoke what was replaced; it expires at its TTL")
            }
        }
    }

    /// A credential file changed (the kubelet rotated the projected token): nothing to do while
    /// the current token is fine; the next login reads the new file. A dead token logs in now.
    async fn check_token(&mut self) {
        match self.client.lookup_self(&self.session.token).await {
            Ok(_) => tracing::debug!("credential file rotated; the current token is still valid"),
            Err(e) if e.is_transient() => {}
            Err(_) => self.relogin().await,
        }
    }

    async fn stop(mut self) -> Result<(), RunError> {
        if state_revoked(&self.config.state_dir) {
            tracing::info!("stopping; the preStop hook already revoked everything");
            return Ok(());
        }
        if !self.config.lifecycle.revoke_on_shutdown {
            tracing::info!("stopping; revoke-on-shutdown is off, leases expire at their TTL");
            return Ok(());
        }
        for retired in self.schedule.drain_retired() {
            self.revoke_retired(retired).await;
        }
        let state: State = state_of(&self.session, &self.fetcher);
        run::revoke_state(&self.client, &state).await;
        let mut done = state;
        done.revoked = true;
        state::save(&self.config.state_dir, &done)?;
        tracing::info!("stopped after revoking every lease and the token");
        Ok(())
    }
}

fn retired_kind(r: &Retired) -> &'static str {
    match r {
        Retired::Lease(_) => "lease",
        Retired::Token(_) => "token",
    }
}

/// `sidekey-agent guard`: waits for SIGTERM, which the kubelet sends a native sidecar only after
/// the app containers have exited (so a Job completes first), then revokes what the init
/// container saved, leases first and then the token. Nothing is renewed or rendered meanwhile:
/// the pod reads files that were rendered once, and a lease that expires first needs no revoking.
pub async fn guard(config: &AgentConfig) -> Result<(), RunError> {
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    spawn_signal_listener(tx);
    tracing::info!("holding the init container's token and leases until the pod stops");
    while let Some(event) = events.recv().await {
        if matches!(event, Event::Stop) {
            break;
        }
    }
    let revoked = crate::run::revoke(config, Duration::ZERO).await?;
    tracing::info!(
        leases = revoked.leases,
        token = revoked.token,
        "pod stopped; revoked"
    );
    Ok(())
}

fn spawn_signal_listener(tx: tokio::sync::mpsc::UnboundedSender<Event>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(Event::Stop);
    });
}

/// Watches the state folder (the preStop hook's revocation) and the credential file's folder
/// (the kubelet's token rotation). Access events are ignored: reading must not wake us.
fn watch_files(
    config: &AgentConfig,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
) -> Vec<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watchers = Vec::new();
    let state_file = config.state_dir.join(state::STATE_FILE);
    let credential = config
        .auth
        .credential_file()
        .map(|f| (f.to_path_buf(), Event::CredentialChanged));
    let targets: Vec<(PathBuf, Event)> = [Some((state_file, Event::StateChanged)), credential]
        .into_iter()
        .flatten()
        .collect();
    for (watched_file, kind) in targets {
        let Some(dir) = watched_file.parent().map(Path::to_path_buf) else {
            continue;
        };
        let tx = tx.clone();
        let is_state = matches!(kind, Event::StateChanged);
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            // Only the file itself, or the `..data` symlink swap the kubelet uses to replace it,
            // counts; other files in the folder (logs, say) must not wake us.
            let relevant = |p: &PathBuf| {
                p == &watched_file
                    || p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("..data"))
            };
            if !event.paths.iter().any(relevant) {
                return;
            }
            let _ = tx.send(if is_state {
                Event::StateChanged
            } else {
                Event::CredentialChanged
            });
        };
        match notify::recommended_watcher(handler) {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => watchers.push(w),
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch folder"),
            },
            Err(e) => tracing::debug!(error = %e, "no file watcher"),
        }
    }
    watchers
}

/// `sidekey-agent ready`: whether the first render is done (for a startup probe).
pub fn is_ready(config: &AgentConfig) -> bool {
    config.state_dir.join(READY_FILE).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str) -> SecretKey {
        SecretKey::read(p)
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_renews_between_a_third_and_two_thirds_of_its_ttl() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let grant = |id: &str| Granted {
            lease_id: id.into(),
            ttl: 60,
            asked: 60,
            renewable: true,
        };
        s.lease_obtained(now, key("a"), grant("a"), 0.0);
        assert_eq!(s.next().unwrap().0, now + Duration::from_secs(20));
        s.lease_obtained(now, key("a"), grant("a"), 1.0);
        assert_eq!(s.next().unwrap().0, now + Duration::from_secs(40));
    }

    #[test]
    fn renewals_fall_between_60_and_70_percent_of_the_ttl() {
        let ttl = Duration::from_secs(600);
        assert_eq!(renew_after(ttl, 0.0), Duration::from_secs(360));
        assert_eq!(renew_after(ttl, 1.0), Duration::from_secs(420));
        for _ in 0..100 {
            let d = renew_after(ttl, jitter());
            assert!(d >= Duration::from_secs(360) && d <= Duration::from_secs(420));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_earliest_duty_comes_first() {
        let now = Instant::now();
        let mut s = Schedule::default();
        assert_eq!(s.next(), None);
        s.token_granted(now, 600, 600, true, 0.0);
        s.lease_granted(
            now,
            key("database/creds/app"),
            Granted {
                lease_id: "l1".into(),
                ttl: 60,
                asked: 60,
                renewable: true,
            },
            0.0,
        );
        s.statics_at(Some(now + Duration::from_secs(300)));
        assert_eq!(
            s.next(),
            Some((
                now + Duration::from_secs(36),
                Duty::RenewLease(key("database/creds/app"))
            ))
        );
        s.lease_granted(
            now,
            key("database/creds/app"),
            Granted {
                lease_id: "l1".into(),
                ttl: 60,
                asked: 60,
                renewable: true,
            },
            0.0,
        );
        tokio::time::advance(Duration::from_secs(36)).await;
        // Renewed with less than asked: replace it now rather than let it run out.
        let later = Instant::now();
        s.lease_granted(
            later,
            key("database/creds/app"),
            Granted {
                lease_id: "l1".into(),
                ttl: 10,
                asked: 60,
                renewable: true,
            },
            0.0,
        );
        s.rotate_now(later, &key("database/creds/app"));
        assert_eq!(
            s.next(),
            Some((later, Duty::Rotate(key("database/creds/app"))))
        );
        s.forget_lease(&key("database/creds/app"));
        assert_eq!(
            s.next(),
            Some((now + Duration::from_secs(300), Duty::RefreshStatic))
        );
        s.retire(now + Duration::from_secs(40), Retired::Lease("old".into()));
        assert_eq!(
            s.next(),
            Some((now + Duration::from_secs(40), Duty::Revoke(0)))
        );
        assert_eq!(s.take_retired(0), Some(Retired::Lease("old".into())));
        assert_eq!(s.take_retired(0), None);
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
    async fn failures_back_off_and_hours_of_renewals_stay_spread() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut s = Schedule::default();
        let start = Instant::now();
        s.token_granted(start, 600, 600, true, 0.3);
        let mut waits = Vec::new();
        for _ in 0..8 {
            let now = Instant::now();
            s.token_failed(now, backoff, Duty::RenewToken);
            let (at, duty) = s.next().unwrap();
            assert_eq!(duty, Duty::RenewToken);
            waits.push(at - now);
            tokio::time::advance(at - now).await;
        }
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(5)),
            "capped: {waits:?}"
        );
        assert!(waits[7] > waits[0], "growing: {waits:?}");

        // An hour of renewals of 500 leases with a 60 s TTL, all obtained at once: the first
        // renewals spread over 20-40 s, every later one lands 36-42 s after the previous one,
        // and no second of the second half hour sees more than three times the mean rate.
        let mut s = Schedule::default();
        let t0 = Instant::now();
        for i in 0..500 {
            s.lease_obtained(
                t0,
                key(&format!("database/creds/r{i}")),
                Granted {
                    lease_id: format!("l{i}"),
                    ttl: 60,
                    asked: 60,
                    renewable: true,
                },
                jitter(),
            );
        }
        let mut per_second = std::collections::HashMap::<u64, u32>::new();
        let mut renewals = 0;
        while let Some((at, Duty::RenewLease(k))) = s.next() {
            if at - t0 > Duration::from_secs(3600) {
                break;
            }
            tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
            let second = (at - t0).as_secs();
            if second >= 1800 {
                *per_second.entry(second).or_default() += 1;
                renewals += 1;
            }
            s.lease_granted(
                at,
                k,
                Granted {
                    lease_id: "l".into(),
                    ttl: 60,
                    asked: 60,
                    renewable: true,
                },
                jitter(),
            );
        }
        let mean = renewals as f64 / 1800.0;
        let peak = *per_second.values().max().unwrap() as f64;
        assert!(renewals > 20_000, "{renewals}");
        assert!(peak <= 3.0 * mean, "peak {peak}/s vs mean {mean}/s");
    }
}
