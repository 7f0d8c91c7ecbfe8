//! `kubectl sidekey`: put this binary on the PATH as `kubectl-sidekey` and kubectl runs it for
//! `kubectl sidekey …`. Exit codes: 0 nothing wrong, 1 something wrong found (a template that
//! does not render, for `render`), 2 the command itself failed (no cluster, no such pod, a bad
//! file).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubectl_sidekey::gather::{Cluster, Target};
use kubectl_sidekey::{diagnose, render, report};

/// Why a pod was (not) injected by Sidekey, and what its templates render.
#[derive(Debug, Parser)]
#[command(name = "kubectl sidekey", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Walks a pod's path to its secrets and names the first thing wrong on the first line:
    /// annotations, the webhook's selectors, the injector's reachability and caBundle, the
    /// injector's decision (its own code), the status annotation, the ValidatingAdmissionPolicy,
    /// the agent containers and their logs' errors.
    Why {
        /// POD, pod/POD, or a workload such as deployment/NAME (for pods that were refused and
        /// never created).
        target: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        /// A Pod or workload manifest (JSON or YAML) instead of an object in the cluster.
        #[arg(short = 'f', long = "filename", conflicts_with = "target")]
        file: Option<String>,
    },
    /// Renders a pod's templates locally against secret data from a file, as the agent would,
    /// and prints the files. No store is asked and nothing is written.
    Render {
        /// POD, pod/POD or a workload such as deployment/NAME.
        target: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        /// A Pod or workload manifest (JSON or YAML) instead of an object in the cluster.
        #[arg(short = 'f', long = "filename", conflicts_with = "target")]
        file: Option<String>,
        /// JSON or YAML map of secret path to the secret's data (what the store answers in
        /// `data`; for KV v2, `{data: {...}, metadata: {...}}`).
        #[arg(long)]
        secrets: String,
    },
}

fn target(target: Option<String>, file: Option<String>) -> Result<Target, String> {
    match (target, file) {
        (_, Some(file)) => Ok(Target::File(file)),
        (Some(t), None) => Target::parse(&t),
        (None, None) => Err("name a pod (or deployment/NAME), or give -f FILE".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Why {
            target: t,
            namespace,
            file,
        } => {
            let target = target(t, file).map_err(anyhow::Error::msg)?;
            let cluster = Cluster::connect().await?;
            let ns = namespace.unwrap_or_else(|| cluster.default_namespace());
            let facts = cluster.facts(&target, &ns).await?;
            let findings = diagnose::diagnose(&facts);
            print!("{}", report::format(&facts.subject, &findings));
            Ok(if report::is_wrong(&findings) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Render {
            target: t,
            namespace,
            file,
            secrets,
        } => {
            let target = target(t, file).map_err(anyhow::Error::msg)?;
            let text = std::fs::read_to_string(&secrets)
                .map_err(|e| anyhow::anyhow!("reading {secrets}: {e}"))?;
            let secrets_data = render::parse_secrets(&text)
                .map_err(|e| anyhow::anyhow!("the secrets file {secrets} {e}"))?;
            let cluster = Cluster::connect().await?;
            let ns = namespace.unwrap_or_else(|| cluster.default_namespace());
            let (subject, encoded) = cluster.render_input(&target, &ns).await?;
            let config = render::decode_config(&encoded).map_err(anyhow::Error::msg)?;
            let results = render::render_all(&config, &secrets_data);
            println!(
                "{subject}: {} file(s), rendered locally (dry run)",
                results.len()
            );
            print!("{}", render::format(&results));
            Ok(if results.iter().any(|r| r.content.is_err()) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
