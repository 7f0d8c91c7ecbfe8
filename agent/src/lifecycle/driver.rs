//! The sidecar's driver: owns the store client, the session, the fetched secrets and the one
//! task in flight; feeds the [`Machine`] its events (deadlines, outcomes, [`Inputs`]) and turns
//! its actions into requests, renders and saves. A task is a future polled here, never spawned:
//! cancelling it drops it, and every path out (SIGTERM, the preStop hook's record, a
//! [`Control`] sender) goes through the machine's one stop. The token watch has two
//! subscribers, the listener and the token sinks' [`TokenFollower`], which is polled beside the
//! loop and dropped with it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::action::{self, Reactions};
use crate::auth::{self, AuthError, Session};
use crate::client::{ClientError, StoreClient, Token};
use crate::config::AgentConfig;
use crate::cycle::{self, Template};
use crate::fetch::{FetchError, Fetcher};
use crate::listener::{self, Listener};
use crate::render::SecretKey;
use crate::revoke::{self, Replaced, StopClock};
use crate::sink::TokenFollower;
use crate::start::{self, RunError, backoff, retry_until, state_of};
use crate::state::{self, State, StopRecord};

use super::READY_FILE;
use super::inputs::{Control, Input, Inputs};
use super::machine::{Action, Event, Failure, Machine, Outcome, Policy, Task, TokenGrant};
use super::schedule::{Granted, Jitter};

/// The sidecar before it runs: [`Sidecar::control`] and [`Sidecar::token`] are how other
/// tasks reach it.
pub struct Sidecar<'a> {
    config: &'a AgentConfig,
    inputs: Inputs,
    token: watch::Sender<Option<Token>>,
}

impl<'a> Sidecar<'a> {
    pub fn new(config: &'a AgentConfig) -> Sidecar<'a> {
        Sidecar {
            config,
            inputs: Inputs::for_sidecar(config),
            token: watch::Sender::new(None),
        }
    }

    /// Stops the sidecar (send [`Input::Stop`]) exactly as SIGTERM does.
    pub fn control(&self) -> Control {
        self.inputs.control()
    }

    /// The sidecar's token, from its first login or adoption on, changed whenever it logs in
    /// again: the one place a token change is seen (the listener and the token sinks follow it).
    pub fn token(&self) -> watch::Receiver<Option<Token>> {
        self.token.subscribe()
    }

    /// Runs until stopped: SIGTERM (or a [`Control`] stop) revokes everything and exits; after
    /// the preStop hook revoked everything, SIGTERM just exits.
    pub async fn run(mut self) -> Result<(), RunError> {
        let config = self.config;
        let templates = cycle::prepare_all(config)?;
        let client = StoreClient::new(&config.store, backoff(config))?;
        let mut sinks = TokenFollower::new(&config.token_sinks, self.token.subscribe());
        for dir in [&config.state_dir, &config.secrets_dir] {
            std::fs::create_dir_all(dir).map_err(|e| state_error(dir, e))?;
        }
        let started = tokio::select! {
            started = start(config, client, templates, self.token.clone()) => started?,
            // Stopped before the first render: what the init container saved is revoked as the
            // preStop hook would (a login of our own in flight dies at its TTL).
            stop = stopped_early(&mut self.inputs, &config.state_dir) => return stop_early(config, stop).await,
        };
        let (mut held, machine) = started;
        // The local API (quit, proxy, lease cache) when the pod asked for it; quit is a stop.
        let listener = match &config.listener {
            Some(l) => {
                let control = self.inputs.control();
                let quit = move || {
                    let _ = control.send(Input::Stop);
                };
                let client = held.client.clone();
                Some(Listener::start(l, client, self.token(), backoff(config), quit).await?)
            }
            None => None,
        };
        // The sinks hold the first token before the pod is told the agent is ready.
        sinks.catch_up();
        std::fs::write(config.state_dir.join(READY_FILE), b"")
            .map_err(|e| state_error(&config.state_dir, e))?;
        tracing::info!(leases = machine.lease_count(), "sidecar running");
        tokio::select! {
            result = drive(&mut held, machine, &mut self.inputs, listener) => result,
            never = sinks.follow() => match never {},
        }
    }
}

/// The stop's record, as an event (`None`: nothing the sidecar acts on).
fn recorded(state_dir: &Path) -> Option<Event> {
    match stop_record(state_dir) {
        Some(r) if r.complete => Some(Event::PreStopRevoked),
        Some(_) => Some(Event::PreStopIncomplete),
        None => None,
    }
}

fn stop_record(state_dir: &Path) -> Option<StopRecord> {
    match state::load_record(state_dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable stop record; taken as absent");
            None
        }
    }
}

fn event_of(input: Input, state_dir: &Path) -> Option<Event> {
    match input {
        Input::Stop => Some(Event::Stop),
        Input::CredentialChanged => Some(Event::CredentialRotated),
        Input::StateChanged => recorded(state_dir),
    }
}

async fn stopped_early(inputs: &mut Inputs, state_dir: &Path) -> Event {
    loop {
        if let Some(e @ (Event::Stop | Event::PreStopRevoked)) =
            event_of(inputs.next().await, state_dir)
        {
            return e;
        }
    }
}

async fn stop_early(config: &AgentConfig, stop: Event) -> Result<(), RunError> {
    if stop == Event::PreStopRevoked || !config.lifecycle.revoke_on_shutdown {
        return Ok(());
    }
    let clock = StopClock::resume(config, stop_record(&config.state_dir).as_ref());
    revoke::revoke_saved(config, clock)
        .await
        .map(|_| ())
        .map_err(RunError::from)
}

/// The loop: wait for a deadline or an input; run each action; while a task runs, inputs still
/// reach the machine, which may cancel it.
async fn drive(
    held: &mut Held<'_>,
    mut machine: Machine,
    inputs: &mut Inputs,
    mut listener: Option<Listener>,
) -> Result<(), RunError> {
    let state_dir = held.config.state_dir.clone();
    let ledger = held.ledger.clone();
    let mut queue: VecDeque<Action> = VecDeque::new();
    loop {
        let Some(action) = queue.pop_front() else {
            let wake = machine.next_wake();
            let react = held.reactions.next_wake();
            let event = tokio::select! {
                () = sleep_until(wake) => Some(Event::Tick),
                // A changed file's actions, once its content has settled (`action`). Inputs
                // still reach the machine meanwhile; a stop does not wait for an action (a
                // restart may take 20 s): what was not finished stays due.
                () = sleep_until(react) => {
                    let work = held.react(Instant::now());
                    tokio::pin!(work);
                    loop {
                        tokio::select! {
                            () = &mut work => break None,
                            input = inputs.next() => match event_of(input, &state_dir) {
                                Some(e) if stops(&e) => break Some(e),
                                Some(e) => queue.extend(tell(&mut machine, &ledger, e)),
                                None => {}
                            },
                        }
                    }
                }
                input = inputs.next() => event_of(input, &state_dir),
                // The proxy's cached leases: renewed here while the machine renews its own,
                // given up for any input that comes meanwhile (a stop must not wait for them;
                // the cache plans a dropped renewal again).
                () = listener::due(listener.as_ref().filter(|_| machine.is_running())) => match &listener {
                    Some(l) => tokio::select! {
                        () = l.renew_due() => None,
                        input = inputs.next() => event_of(input, &state_dir),
                    },
                    None => None,
                },
            };
            if let Some(event) = event {
                queue.extend(tell(&mut machine, &ledger, event));
            }
            continue;
        };
        match action {
            Action::Perform(task) => {
                let logging_in = task == Task::Login;
                let outcome = {
                    let work = held.perform(task);
                    tokio::pin!(work);
                    loop {
                        tokio::select! {
                            outcome = &mut work => break Some(outcome),
                            input = inputs.next() => {
                                let Some(event) = event_of(input, &state_dir) else { continue };
                                let actions = tell(&mut machine, &ledger, event);
                                let cancelled = actions.first() == Some(&Action::Cancel);
                                queue.extend(actions.into_iter().filter(|a| a != &Action::Cancel));
                                if cancelled {
                                    if logging_in {
                                        settle_login(work.as_mut(), &ledger).await;
                                    }
                                    tracing::info!("the task in flight is cancelled");
                                    break None;
                                }
                            }
                        }
                    }
                };
                if let Some(outcome) = outcome {
                    queue.extend(tell(&mut machine, &ledger, Event::Done(outcome)));
                }
            }
            // Nothing is in flight outside `Perform`.
            Action::Cancel => {}
            Action::Hold { revoked: true } => {
                // What the proxy obtained is not in the state file the hook revoked from.
                if let Some(l) = listener.take() {
                    let clock = StopClock::resume(held.config, stop_record(&state_dir).as_ref());
                    l.shut_down(true, clock.deadline).await;
                }
                // Exiting here would kill the preStop hook's own process with the container
                // (the kubelet then reports the hook as failed); the kubelet sends SIGTERM as
                // soon as the hook returns.
                tracing::info!(
                    "the state was revoked (preStop); renewing nothing more, waiting for SIGTERM"
                );
            }
            Action::Hold { revoked: false } => {
                tracing::warn!(
                    "the preStop revocation left something; renewing nothing more, revoking again on SIGTERM"
                );
            }
            Action::Shutdown {
                revoke,
                mut replaced,
            } => {
                replaced.extend(std::mem::take(&mut lock(&ledger).obtained));
                held.token_asked = machine.token_asked();
                return held.shutdown(revoke, replaced, listener.take()).await;
            }
            Action::GiveUp {
                revoke,
                mut replaced,
            } => {
                replaced.extend(std::mem::take(&mut lock(&ledger).obtained));
                held.token_asked = machine.token_asked();
                let stopped = held.shutdown(revoke, replaced, listener.take()).await;
                if let Err(e) = &stopped {
                    tracing::error!(error = %e, "could not revoke everything while giving up");
                }
                return match held.refused.take() {
                    Some(e) => Err(RunError::Auth(e)),
                    None => stopped,
                };
            }
            Action::Exit { mut replaced } => {
                replaced.extend(std::mem::take(&mut lock(&ledger).obtained));
                return held.exit(replaced).await;
            }
        }
    }
}

/// What the driver and the task in flight share: credentials the task obtained that the
/// machine has not been told of, and what the machine still has to revoke. Both are saved with
/// the state, so the preStop hook revokes them too.
#[derive(Default)]
struct Ledger {
    obtained: Vec<Replaced>,
    outstanding: Vec<Replaced>,
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// Steps the machine: first with what the task in flight obtained meanwhile, so an event that
/// cancels the task finds it accounted for.
fn tell(machine: &mut Machine, ledger: &Mutex<Ledger>, event: Event) -> Vec<Action> {
    let mut ledger = lock(ledger);
    let now = Instant::now();
    for what in std::mem::take(&mut ledger.obtained) {
        machine.step(Event::Obtained(what), now);
    }
    let actions = machine.step(event, now);
    ledger.outstanding = machine.outstanding();
    actions
}

/// How long a stop waits for a login on the wire to answer.
const LOGIN_SETTLE: Duration = Duration::from_secs(3);

/// A login being cancelled may have made a token already, one the agent would never see: the
/// login's own request is given [`LOGIN_SETTLE`] to answer, so its token reaches the ledger
/// (and is revoked with the rest); the fetches after it are not waited for.
async fn settle_login(
    mut work: std::pin::Pin<&mut impl std::future::Future<Output = Outcome>>,
    ledger: &Mutex<Ledger>,
) {
    let obtained = async {
        loop {
            if !lock(ledger).obtained.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(LOGIN_SETTLE, async {
        tokio::select! {
            _ = work.as_mut() => {}
            () = obtained => {}
        }
    })
    .await;
}

/// Whether an event ends the sidecar's work (it does not wait for an action).
fn stops(event: &Event) -> bool {
    matches!(
        event,
        Event::Stop | Event::PreStopRevoked | Event::PreStopIncomplete
    )
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn state_error(dir: &Path, e: std::io::Error) -> RunError {
    RunError::State(state::StateError::File {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })
}

fn policy(config: &AgentConfig) -> Policy {
    Policy {
        backoff: backoff(config),
        static_interval: Duration::from_secs(config.lifecycle.static_secret_render_interval_secs),
        revoke_on_shutdown: config.lifecycle.revoke_on_shutdown,
    }
}

/// What a failed request means for deciding.
fn failure_of(e: &ClientError) -> Failure {
    if e.is_transient() {
        Failure::Transient
    } else if e.status() == Some(403) {
        Failure::Denied
    } else {
        Failure::Refused
    }
}

fn fetch_failure(e: &FetchError) -> Failure {
    failure_of(&e.source)
}

/// The leased secrets `fetcher` holds, as just obtained.
fn leases_of(fetcher: &Fetcher) -> Vec<(SecretKey, Granted)> {
    fetcher
        .secrets()
        .iter()
        .filter(|(_, s)| !s.lease_id.is_empty())
        .map(|(k, s)| {
            (
                k.clone(),
                Granted::new(s.lease_id.clone(), s.lease_duration, s.renewable),
            )
        })
        .collect()
}

/// Everything the driver holds for its I/O.
struct Held<'a> {
    config: &'a AgentConfig,
    client: StoreClient,
    templates: Vec<Template>,
    session: Session,
    fetcher: Fetcher,
    /// The increment asked at each token renewal, recorded in the state.
    token_asked: u64,
    token: watch::Sender<Option<Token>>,
    ledger: Arc<Mutex<Ledger>>,
    /// The login error that made the machine give up.
    refused: Option<AuthError>,
    /// When the templates' actions are due (`agent-inject-action-NAME`).
    reactions: Reactions,
}

/// Adopts the init container's state, or does the init container's work here.
async fn start<'a>(
    config: &'a AgentConfig,
    client: StoreClient,
    templates: Vec<Template>,
    token: watch::Sender<Option<Token>>,
) -> Result<(Held<'a>, Machine), RunError> {
    // What the actions last ran for (or the app started with), as saved.
    let done = match state::load(&config.state_dir) {
        Ok(Some(s)) => s.actions_done,
        _ => Default::default(),
    };
    let begin = |client, templates, session: Session, fetcher, grant: TokenGrant, leases| {
        token.send_replace(Some(Token::clone(&session.token)));
        let machine = Machine::new(
            Instant::now(),
            policy(config),
            Jitter::random(),
            grant,
            leases,
        );
        let held = Held {
            config,
            client,
            templates,
            session,
            fetcher,
            token_asked: grant.asked,
            token: token.clone(),
            ledger: Arc::default(),
            refused: None,
            reactions: Reactions::new(action::Policy::default(), done.clone()),
        };
        (held, machine)
    };
    if let Some((session, fetcher, grant, leases)) = adopt(config, &client).await? {
        let (mut held, machine) = begin(client, templates, session, fetcher, grant, leases);
        held.observe(Instant::now());
        return Ok((held, machine));
    }
    // No usable init state (native sidecar, pre-populate off, or an expired token).
    let limit = Duration::from_secs(config.lifecycle.init_timeout_secs);
    let (session, fetcher) = retry_until(limit, backoff(config), "first render", || {
        start::first_render(config, &client, &templates, &config.secrets_dir)
    })
    .await?;
    let grant = TokenGrant {
        ttl: session.ttl_secs,
        asked: session.ttl_secs,
        renewable: session.renewable,
    };
    let leases = leases_of(&fetcher);
    let (mut held, machine) = begin(client, templates, session, fetcher, grant, leases);
    held.observe(Instant::now());
    held.save();
    Ok((held, machine))
}

type Adopted = (Session, Fetcher, TokenGrant, Vec<(SecretKey, Granted)>);

/// Takes over the init container's state when its token is still valid.
async fn adopt(config: &AgentConfig, client: &StoreClient) -> Result<Option<Adopted>, RunError> {
    if stop_record(&config.state_dir).is_some_and(|r| r.complete) {
        // The preStop hook revoked what the state holds.
        return Ok(None);
    }
    let saved = match state::load(&config.state_dir) {
        Ok(Some(s)) if !s.revoked => s,
        Ok(_) => return Ok(None),
        Err(e) if config.listener.as_ref().is_some_and(|l| l.exit_on_err) => {
            // agent-cache-exit-on-err: the hand-off is Sidekey's persistent cache.
            return Err(e.into());
        }
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
    let session = Session {
        token: saved.token.clone(),
        accessor: saved.accessor.clone(),
        ttl_secs: info.ttl,
        renewable: info.renewable,
        owned: saved.token_owned,
    };
    let mut fetcher = Fetcher::new(client.clone(), saved.token.clone());
    let mut leases = Vec::new();
    let unix_now = state::now_secs();
    for held in &saved.secrets {
        fetcher.adopt(held.key.clone(), held.secret.clone());
        if !held.secret.lease_id.is_empty() {
            let age = unix_now.saturating_sub(held.renewed_at);
            let left = held.secret.lease_duration.saturating_sub(age);
            let grant = Granted::new(held.secret.lease_id.clone(), left, held.secret.renewable);
            leases.push((held.key.clone(), grant));
        }
    }
    let grant = TokenGrant {
        ttl: info.ttl,
        asked: saved.token_ttl_secs.max(info.ttl),
        renewable: info.renewable,
    };
    tracing::info!(accessor = %saved.accessor, leases = leases.len(), "adopted the init container's token and leases");
    Ok(Some((session, fetcher, grant, leases)))
}

impl Held<'_> {
    /// Saves what `revoke` and a restarted sidecar need. Renewals do not save (with a thousand
    /// leases that would rewrite a large file many times a second); rotations, logins and
    /// changed static secrets do. What the preStop hook recorded is never overwritten.
    fn save(&self) {
        let mut state = state_of(&self.session, &self.fetcher);
        state.token_ttl_secs = self.token_asked;
        state.actions_done = self.reactions.done().clone();
        {
            let ledger = lock(&self.ledger);
            state.retired = ledger.outstanding.clone();
            state.retired.extend(ledger.obtained.iter().cloned());
        }
        // The record is the hook's word; the state's flags only mirror it.
        if let Some(record) = stop_record(&self.config.state_dir) {
            state.revoked = record.complete;
            state.stopping = !record.complete;
        }
        if let Err(e) = state::save(&self.config.state_dir, &state) {
            tracing::warn!(error = %e, "could not save the agent state");
        }
    }

    /// The task in flight obtained `what`: the machine hears of it before the task's next
    /// await, and the state file holds it at once (for the preStop hook).
    fn obtained(&self, what: Replaced) {
        lock(&self.ledger).obtained.push(what);
        self.save();
    }

    async fn render(&mut self) {
        // The env file first, so a `restart:` action on a file of the same secret restarts the
        // container with the new values (the kubelet reads the file at every container start).
        if let Some(env) = &self.config.env {
            match crate::env_file::render_and_write(env, &mut self.fetcher).await {
                Ok(true) => tracing::warn!(
                    "a secret behind the pod's environment variables changed: the env file holds the new values, which a container reads when it (re)starts; running processes keep the values they started with"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the env file could not be rewritten; the previous one is kept")
                }
            }
        }
        let results =
            cycle::render_all(&self.templates, &mut self.fetcher, &self.config.secrets_dir).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::warn!(
                failed,
                "some templates could not be rendered; their previous files are kept"
            );
        }
        self.observe(Instant::now());
    }

    /// Tells the reactions what each file with actions now holds (its digest).
    fn observe(&mut self, now: Instant) {
        for (template, digest) in action::digests(self.config, &self.config.secrets_dir) {
            self.reactions.rendered(&template, &digest, now);
        }
    }

    /// Performs the actions that are due, each template's in order, and records the outcome.
    async fn react(&mut self, now: Instant) {
        let mut acted = false;
        for (name, digest) in self.reactions.due(now) {
            // Every template with a digest has actions; none found is nothing to do.
            let actions = self
                .templates
                .iter()
                .find(|t| t.config.name == name)
                .map_or(&[][..], |t| &t.config.actions[..]);
            let proc = Path::new(crate::signal::PROC);
            let ok = action::perform_all(&name, actions, proc).await;
            match self.reactions.finished(&name, &digest, ok, Instant::now()) {
                action::Verdict::Done => acted = true,
                action::Verdict::Retry(at) => {
                    let in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64;
                    tracing::info!(template = %name, retry_in_ms = in_ms, "the actions will be tried again");
                }
                action::Verdict::GivenUp => {
                    action::COUNTERS
                        .given_up
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(template = %name, "the actions failed every attempt; giving up until the content changes again");
                }
                action::Verdict::Superseded => {}
            }
        }
        if acted {
            self.save();
        }
    }

    async fn perform(&mut self, task: Task) -> Outcome {
        tracing::debug!(?task, "due");
        match task {
            Task::RenewToken { increment } => self.renew_token(increment).await,
            Task::Login => self.relogin().await,
            Task::RenewLease {
                key,
                lease_id,
                increment,
            } => self.renew_lease(key, &lease_id, increment).await,
            Task::Rotate { key } => self.rotate(key).await,
            Task::RefreshStatics => self.refresh_static().await,
            Task::CheckToken => self.check_token().await,
            Task::Revoke(replaced) => self.revoke_replaced(replaced).await,
        }
    }

    async fn renew_token(&mut self, increment: Option<u64>) -> Outcome {
        match self.client.renew_self(&self.session.token, increment).await {
            Ok(auth) => {
                self.session.ttl_secs = auth.lease_duration;
                self.session.renewable = auth.renewable;
                tracing::info!(ttl_secs = auth.lease_duration, "token renewed");
                Outcome::TokenRenewed {
                    ttl: auth.lease_duration,
                    renewable: auth.renewable,
                }
            }
            Err(e) => {
                let failure = failure_of(&e);
                match failure {
                    Failure::Transient => {
                        tracing::warn!(error = %e, "token renewal failed; will retry")
                    }
                    _ => {
                        tracing::warn!(error = %e, "the store refused to renew the token; logging in again")
                    }
                }
                Outcome::Failed(failure)
            }
        }
    }

    /// A new login: every leased secret is fetched again under the new token (leases die with
    /// the token that created them) and the files are re-rendered; the machine keeps the old
    /// token for an overlap so the app can move to the new credentials. Until the one commit
    /// point after the last await, the driver holds the old session: a stop at any await
    /// revokes it, and the new token is already with the machine and in the state file.
    async fn relogin(&mut self) -> Outcome {
        if recorded(&self.config.state_dir).is_some() {
            // The preStop hook ran; its record reaches the machine as an event.
            tracing::info!("the preStop hook ran; not logging in again");
            return Outcome::Failed(Failure::Transient);
        }
        let session = match auth::login(&self.client, &self.config.auth).await {
            Ok(s) => s,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "login failed; will retry");
                return Outcome::Failed(Failure::Transient);
            }
            Err(e) => {
                tracing::error!(error = %e, "the store refuses the login; it will not pass by itself");
                self.refused = Some(e);
                return Outcome::Failed(Failure::Refused);
            }
        };
        tracing::info!(accessor = %session.accessor, "logged in again");
        if session.owned && session.token != self.session.token {
            self.obtained(Replaced::Token(session.token.clone()));
        }
        let mut fresh = Fetcher::new(self.client.clone(), session.token.clone());
        for (key, secret) in self.fetcher.secrets() {
            if secret.lease_id.is_empty() {
                fresh.adopt(key.clone(), secret.clone());
                continue;
            }
            match fresh.fetch(key).await {
                // A lease dies with the token that created it, unless the token is not ours.
                Ok(got) if !session.owned && !got.lease_id.is_empty() => {
                    let lease = got.lease_id.clone();
                    self.obtained(Replaced::Lease(lease));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not fetch a secret under the new token; it is fetched at the next render")
                }
            }
        }
        let results =
            cycle::render_all(&self.templates, &mut fresh, &self.config.secrets_dir).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::warn!(
                failed,
                "some templates could not be rendered; their previous files are kept"
            );
        }
        // The commit: no await from here on.
        let old = std::mem::replace(&mut self.session, session);
        self.fetcher = fresh;
        self.observe(Instant::now());
        self.token_asked = self.session.ttl_secs;
        self.token.send_replace(Some(self.session.token.clone()));
        let replaced = (old.owned && old.token != self.session.token).then_some(old.token);
        if let Some(old) = &replaced {
            // Until the outcome reaches the machine, the old token is the task's to revoke.
            lock(&self.ledger)
                .obtained
                .push(Replaced::Token(old.clone()));
        }
        self.save();
        Outcome::LoggedIn {
            ttl: self.session.ttl_secs,
            renewable: self.session.renewable,
            leases: leases_of(&self.fetcher),
            replaced,
        }
    }

    async fn renew_lease(
        &mut self,
        key: SecretKey,
        lease_id: &str,
        increment: Option<u64>,
    ) -> Outcome {
        match self
            .client
            .renew_lease(&self.session.token, lease_id, increment)
            .await
        {
            Ok(grant) => {
                let capped = increment.is_some_and(|asked| grant.lease_duration < asked);
                tracing::info!(secret = %key, ttl_secs = grant.lease_duration, capped, "lease renewed");
                if let Some(mut renewed) = self.fetcher.secrets().get(&key).cloned() {
                    renewed.lease_duration = grant.lease_duration;
                    self.fetcher.adopt(key.clone(), renewed);
                }
                Outcome::LeaseRenewed {
                    key,
                    ttl: grant.lease_duration,
                    renewable: grant.renewable,
                }
            }
            Err(e) => {
                let failure = failure_of(&e);
                match failure {
                    Failure::Transient => {
                        tracing::warn!(secret = %key, error = %e, "lease renewal failed; will retry")
                    }
                    _ => {
                        tracing::warn!(secret = %key, error = %e, "the store refused to renew the lease; fetching a new secret")
                    }
                }
                Outcome::Failed(failure)
            }
        }
    }

    /// A new secret in place of one whose lease cannot be extended further. The new lease is
    /// the machine's (and the state file's) as soon as it exists; once adopted, the old one is
    /// too, so a stop while the files are rendered revokes both.
    async fn rotate(&mut self, key: SecretKey) -> Outcome {
        let old = self.fetcher.secrets().get(&key).cloned();
        // A running process cannot be given new variables: the lease behind one is kept alive
        // as long as the store allows (to its max TTL), neither replaced nor revoked early.
        if let Some(env) = &self.config.env {
            let vars = crate::env_file::vars_using(env, &self.fetcher.known(), &key);
            if !vars.is_empty() {
                tracing::warn!(secret = %key, vars = %vars.join(","), "the lease behind these environment variables cannot be renewed further; it is kept until it expires, and the app's credential with it: restart the pod before, or raise the role's max TTL");
                return Outcome::Rotated {
                    key,
                    new: None,
                    old: None,
                };
            }
        }
        let secret = match self.fetcher.fetch_fresh(&key).await {
            Ok(secret) => secret,
            Err(e) => {
                tracing::warn!(secret = %key, error = %e, "could not fetch a new secret; the current file is kept");
                return Outcome::Failed(fetch_failure(&e));
            }
        };
        tracing::info!(secret = %key, "fetched a new secret in place of one that cannot be renewed further");
        let new = (!secret.lease_id.is_empty()).then(|| {
            Granted::new(
                secret.lease_id.clone(),
                secret.lease_duration,
                secret.renewable,
            )
        });
        let old = old
            .filter(|o| !o.lease_id.is_empty())
            .map(|o| (o.lease_id, o.lease_duration));
        {
            let mut ledger = lock(&self.ledger);
            if let Some(grant) = &new {
                ledger
                    .obtained
                    .push(Replaced::Lease(grant.lease_id.clone()));
            }
            if let Some((id, _)) = &old {
                ledger.obtained.push(Replaced::Lease(id.clone()));
            }
        }
        self.fetcher.adopt(key.clone(), secret);
        self.save();
        self.render().await;
        Outcome::Rotated { key, new, old }
    }

    /// Re-reads every secret without a lease (KV); files change only if their content did.
    async fn refresh_static(&mut self) -> Outcome {
        let keys: Vec<SecretKey> = self
            .fetcher
            .secrets()
            .iter()
            .filter(|(_, s)| s.lease_id.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
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
                    return Outcome::Failed(fetch_failure(&e));
                }
            }
        }
        if changed {
            self.render().await;
            self.save();
        }
        Outcome::StaticsRefreshed
    }

    /// Whether the store still knows the token: after a refusal, or a rotated credential file
    /// (nothing to do while the token is fine; the next login reads the new file).
    async fn check_token(&mut self) -> Outcome {
        let alive = match self.client.lookup_self(&self.session.token).await {
            Ok(_) => Some(true),
            Err(e) if e.status() == Some(403) => Some(false),
            Err(e) => {
                tracing::debug!(error = %e, "could not check the token");
                None
            }
        };
        tracing::debug!(?alive, "token checked");
        Outcome::TokenChecked { alive }
    }

    async fn revoke_replaced(&mut self, replaced: Replaced) -> Outcome {
        let (what, result) = match &replaced {
            Replaced::Lease(id) => (
                "lease",
                self.client.revoke_lease(&self.session.token, id).await,
            ),
            Replaced::Token(token) => ("token", self.client.revoke_self(token).await),
        };
        match result {
            Ok(()) => tracing::info!(what, "revoked what was replaced"),
            Err(e) => {
                tracing::info!(what, error = %e, "could not revoke what was replaced; it expires at its TTL")
            }
        }
        Outcome::ReplacedRevoked
    }

    /// Every credential the driver holds: its token (when it is ours) and its leases.
    fn credentials(&self) -> Vec<Replaced> {
        let mut all = Vec::new();
        if self.session.owned {
            all.push(Replaced::Token(self.session.token.clone()));
        }
        all.extend(
            leases_of(&self.fetcher)
                .into_iter()
                .map(|(_, g)| Replaced::Lease(g.lease_id)),
        );
        all
    }

    /// Revokes everything held, the replaced leases and tokens included, and what the proxy's
    /// cache holds, all by one deadline: the one the preStop hook began, or one beginning now.
    /// Fails, leaving the record incomplete, when something is left.
    async fn shutdown(
        &self,
        revoke: bool,
        replaced: Vec<Replaced>,
        listener: Option<Listener>,
    ) -> Result<(), RunError> {
        let dir = &self.config.state_dir;
        let record = stop_record(dir);
        let clock = StopClock::resume(self.config, record.as_ref());
        let proxy = async {
            if let Some(l) = listener {
                l.shut_down(revoke, clock.deadline).await;
            }
        };
        if !revoke {
            proxy.await;
            tracing::info!("stopping; revoke-on-shutdown is off, leases expire at their TTL");
            return Ok(());
        }
        if let Some(record) = record.filter(|r| r.complete) {
            // Revoked by the hook: only what it could not know of is left.
            let mut what = self.credentials();
            what.extend(replaced);
            let rest = revoke::revoke_uncovered(
                &self.client,
                &self.session.token,
                what,
                Some(&record),
                clock.deadline,
            );
            let ((), report) = tokio::join!(proxy, rest);
            tracing::info!(%report, "stopping; the preStop hook already revoked the rest");
            return Ok(());
        }
        let mut state: State = state_of(&self.session, &self.fetcher);
        state.token_ttl_secs = self.token_asked;
        state.actions_done = self.reactions.done().clone();
        state.retired = replaced;
        let held = revoke::revoke_held(&self.client, &state, Vec::new(), clock.deadline);
        let ((), report) = tokio::join!(proxy, held);
        let complete = report.is_complete();
        revoke::record(self.config, &state, clock, complete)?;
        state.revoked = complete;
        state.stopping = !complete;
        state::save(dir, &state)?;
        if !complete {
            return Err(RunError::Revocation(report));
        }
        tracing::info!(%report, "stopped after revoking everything");
        Ok(())
    }

    /// SIGTERM after the preStop hook revoked everything it knew of: what it could not know
    /// (obtained after it read the state, or replaced and waiting out an overlap) is revoked
    /// here.
    async fn exit(&self, replaced: Vec<Replaced>) -> Result<(), RunError> {
        let record = stop_record(&self.config.state_dir);
        let clock = StopClock::resume(self.config, record.as_ref());
        let mut what = self.credentials();
        what.extend(replaced);
        let report = revoke::revoke_uncovered(
            &self.client,
            &self.session.token,
            what,
            record.as_ref(),
            clock.deadline,
        )
        .await;
        tracing::info!(%report, "stopping; the preStop hook already revoked the rest");
        if report.is_complete() {
            Ok(())
        } else {
            Err(RunError::Revocation(report))
        }
    }
}
