use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sidekey_agent::config::{AgentConfig, LogConfig};
use sidekey_agent::hcl_config::NoteKind;
use sidekey_agent::lifecycle;
use sidekey_agent::run::{self, RunError};

/// Sidekey agent: renders secrets from Vault or OpenBao into files.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Agent config (JSON). Without it, SIDEKEY_AGENT_CONFIG (base64 JSON) is read.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Render every file once, save the token and leases for the sidecar, exit.
    Init(ConfigArg),
    /// Render once into a folder of your choice, for local use and debugging.
    Render {
        #[command(flatten)]
        config: ConfigArg,
        /// Folder to render into (instead of the config's secrets_dir).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Folder for the state file (token and leases), so `revoke` can clean up later.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Keep the files fresh: adopt the init container's token and leases, renew, re-render,
    /// and revoke everything on SIGTERM (when revoke-on-shutdown is set).
    Sidecar(ConfigArg),
    /// Hold the init container's token and leases, renewing and rendering nothing, and revoke
    /// them all on SIGTERM: the revoke-only native sidecar of pre-populate-only pods, so a Job's
    /// leases end with the Job.
    Guard(ConfigArg),
    /// Exit 0 once the first render is done (a native sidecar's startup probe).
    Ready(ConfigArg),
    /// Set the variables of an env file and replace this process with COMMAND (same PID,
    /// signals and exit code): the env-file reader of clusters without env files.
    Exec {
        /// The env file the agent's init container wrote.
        #[arg(long, value_name = "FILE")]
        env_file: PathBuf,
        /// A variable to set: NAME, or NAME=KEY when its key in the file differs.
        #[arg(long = "var", value_name = "NAME[=KEY]")]
        vars: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Revoke every lease and the token of the saved state (the preStop hook).
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// Seconds to wait before revoking; defaults to the config's revoke grace.
        #[arg(long)]
        grace: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The wrapper replaces itself with the app: no runtime, no threads, nothing to inherit.
    if let Command::Exec {
        env_file,
        vars,
        command,
    } = &cli.command
    {
        let wanted: Vec<_> = vars
            .iter()
            .map(|v| sidekey_agent::exec::Wanted::parse(v))
            .collect();
        let e = sidekey_agent::exec::exec(env_file, &wanted, command);
        eprintln!("sidekey-agent exec: {e}");
        return ExitCode::from(e.exit_code());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    runtime.block_on(async_main(cli))
}

/// The config, with the pod's Vault Agent HCL file read over it in agent-configmap mode:
/// `config-init.hcl` for `init`, `config.hcl` for the rest, as vault-k8s runs Vault Agent.
fn load_with(arg: &ConfigArg, hcl_file: &str) -> Result<AgentConfig, RunError> {
    let config = AgentConfig::load(arg.config.as_deref())?;
    sidekey_agent::log::init(&config.log);
    let (config, notes) = sidekey_agent::hcl_config::with_vault_agent_config(config, hcl_file)?;
    for note in notes {
        match note.kind {
            NoteKind::Overridden => tracing::info!("{}", note.text),
            NoteKind::Ignored => tracing::warn!("{}", note.text),
        }
    }
    Ok(config)
}

fn load(arg: &ConfigArg) -> Result<AgentConfig, RunError> {
    load_with(arg, sidekey_agent::hcl_config::SIDECAR_FILE)
}

async fn async_main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Init(arg) => match load_with(&arg, sidekey_agent::hcl_config::INIT_FILE) {
            Ok(config) => run::init(&config).await.map(|_| ()),
            Err(e) => Err(e),
        },
        Command::Render { config, out, state } => match load(&config) {
            Ok(mut config) => {
                if let Some(state) = state {
                    config.state_dir = state;
                } else {
                    config.state_dir = out.join(".sidekey-state");
                }
                run::render_and_save(&config, &out).await.map(|_| ())
            }
            Err(e) => Err(e),
        },
        Command::Sidecar(arg) => match load(&arg) {
            Ok(config) => lifecycle::sidecar(&config).await,
            Err(e) => Err(e),
        },
        Command::Guard(arg) => match load(&arg) {
            Ok(config) => lifecycle::guard(&config).await,
            Err(e) => Err(e),
        },
        Command::Ready(arg) => match AgentConfig::load(arg.config.as_deref()) {
            Ok(config) if lifecycle::is_ready(&config) => Ok(()),
            Ok(_) => return ExitCode::from(1),
            Err(e) => Err(e.into()),
        },
        Command::Exec { .. } => unreachable!("exec runs before the runtime starts"),
        Command::Revoke { config, grace } => match load(&config) {
            Ok(config) => {
                let grace =
                    Duration::from_secs(grace.unwrap_or(config.lifecycle.revoke_grace_secs));
                // The running sidecar sees the revocation in the state file and stops renewing;
                // it is not signalled: in a container it is PID 1, and its exit would kill this
                // hook before it returns (the kubelet sends SIGTERM once it has).
                run::revoke(&config, grace).await.map(|_| ())
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

/// One clear line on stderr, logged as well, and written where the kubelet takes a container's
/// termination message from, so `kubectl describe pod` and the pod's status show it.
fn fail(message: &str, code: i32) -> ExitCode {
    sidekey_agent::log::init(&LogConfig::default());
    tracing::error!(error = %message, "sidekey-agent failed");
    eprintln!("sidekey-agent: {message}");
    write_termination_message(&format!("sidekey-agent: {message}"));
    ExitCode::from(code as u8)
}

/// The kubelet's default `terminationMessagePath`; it exists only in a container (elsewhere
/// nothing is written). The kubelet keeps at most 4096 bytes; the line is cut on a character
/// boundary below that.
const TERMINATION_LOG: &str = "/dev/termination-log";

fn write_termination_message(line: &str) {
    let path = std::path::Path::new(TERMINATION_LOG);
    if !path.exists() {
        return;
    }
    let mut end = line.len().min(4000);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let one_line = line[..end].replace('\n', " ");
    // Best effort: the message is also on stderr and in the log.
    let _ = std::fs::write(path, one_line);
}
