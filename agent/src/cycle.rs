//! One render cycle: for each template, render in passes (fetching what each pass asks for),
//! write the file if its content changed, and run its command. A template that fails leaves its
//! old file in place and does not stop the others.

use std::path::Path;
use std::time::Duration;

use crate::command;
use crate::config::{AgentConfig, TemplateConfig};
use crate::fetch::{FetchError, Fetcher};
use crate::render::{self, Outcome, Prepared, RenderError};
use crate::sink::{self, SinkError};

/// How many fetch-and-render rounds one template may need (secrets whose path comes from
/// another secret need more than one).
const MAX_PASSES: usize = 8;
const COMMAND_TIME_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("template {0}: still asks for new secrets after {MAX_PASSES} rounds")]
    TooManyPasses(String),
    #[error("template {template}: cannot read template file {path}: {detail}")]
    Source {
        template: String,
        path: String,
        detail: String,
    },
}

impl CycleError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CycleError::Fetch(e) if e.is_transient())
    }
}

/// A template checked and ready, with its config.
#[derive(Clone)]
pub struct Template {
    pub config: TemplateConfig,
    pub prepared: Prepared,
}

/// Loads template files and checks every template; the first problem is returned.
pub fn prepare_all(config: &AgentConfig) -> Result<Vec<Template>, CycleError> {
    config
        .templates
        .iter()
        .map(|t| {
            let source = match (&t.contents, &t.source) {
                (None, Some(path)) => {
                    Some(
                        std::fs::read_to_string(path).map_err(|e| CycleError::Source {
                            template: t.name.clone(),
                            path: path.display().to_string(),
                            detail: e.to_string(),
                        })?,
                    )
                }
                _ => None,
            };
            Ok(Template {
                config: t.clone(),
                prepared: render::prepare(t, source)?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    pub name: String,
    pub file: String,
    pub written: bool,
    pub command: Option<CommandOutcome>,
}

/// Renders one template to text, fetching what it needs.
pub async fn render_text(p: &Prepared, fetcher: &mut Fetcher) -> Result<Vec<u8>, CycleError> {
    for _ in 0..MAX_PASSES {
        match render::render(p, &fetcher.known())? {
            Outcome::Rendered {
                text,
                missing,
                writes,
            } => {
                for (path, perms, content, append) in writes {
                    sink::write_file(std::path::Path::new(&path), &content, &perms, append)
                        .map_err(CycleError::Sink)?;
                }
                for key in missing {
                    tracing::warn!(template = %p.name, key = %key, "template refers to a missing key; it rendered empty");
                }
                return Ok(text);
            }
            Outcome::Needs(keys) => {
                for key in keys {
                    fetcher.fetch(&key).await?;
                }
            }
        }
    }
    Err(CycleError::TooManyPasses(p.name.clone()))
}

/// Renders, writes and runs the command of one template.
pub async fn render_one(
    t: &Template,
    fetcher: &mut Fetcher,
    out_dir: &Path,
) -> Result<FileReport, CycleError> {
    let text = render_text(&t.prepared, fetcher).await?;
    tracing::debug!(template = %t.config.name, bytes = text.len(), "template rendered");
    // A template with a folder of its own (secret-volume-path-NAME) renders there.
    let out_dir = t.config.dir.as_deref().unwrap_or(out_dir);
    let written = sink::write_if_changed(out_dir, &t.config.file, &text, t.config.mode())?;
    let command = match (&t.config.command, written) {
        (Some(cmd), true) => Some(run_command(cmd, out_dir).await),
        _ => None,
    };
    if let Some(CommandOutcome::Failed(why)) = &command {
        tracing::warn!(template = %t.config.name, reason = %why, "template command failed");
    }
    Ok(FileReport {
        name: t.config.name.clone(),
        file: t.config.file.clone(),
        written,
        command,
    })
}

/// The outcome of a template's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    Succeeded,
    Failed(String),
}

/// Performs a template's command in the agent itself (the image has no shell), within a time
/// limit, in the folder its file is rendered into. The config was checked, so it parses.
async fn run_command(text: &str, dir: &Path) -> CommandOutcome {
    let script = match command::parse(text) {
        Ok(s) => s,
        Err(e) => return CommandOutcome::Failed(e.to_string()),
    };
    match tokio::time::timeout(COMMAND_TIME_LIMIT, script.run(dir)).await {
        Ok(Ok(())) => CommandOutcome::Succeeded,
        Ok(Err(e)) => CommandOutcome::Failed(e.to_string()),
        Err(_) => CommandOutcome::Failed(format!(
            "still running after {}s; abandoned",
            COMMAND_TIME_LIMIT.as_secs()
        )),
    }
}

/// Fetches what every template needs before any is rendered, each round concurrently, so the
/// first render costs one round trip per dependency level rather than one per secret. Errors
/// are left for `render_one` to report per template.
async fn prefetch(templates: &[Template], fetcher: &mut Fetcher) {
    for _ in 0..MAX_PASSES {
        let known = fetcher.known();
        let mut needed: Vec<_> = templates
            .iter()
            .filter_map(|t| match render::render(&t.prepared, &known) {
                Ok(Outcome::Needs(keys)) => Some(keys),
                _ => None,
            })
            .flatten()
            .collect();
        needed.sort();
        needed.dedup();
        if needed.is_empty() || fetcher.fetch_all(needed).await.is_err() {
            return;
        }
    }
}

/// Renders every template; one result per template, in order.
pub async fn render_all(
    templates: &[Template],
    fetcher: &mut Fetcher,
    out_dir: &Path,
) -> Vec<Result<FileReport, CycleError>> {
    prefetch(templates, fetcher).await;
    let mut results = Vec::with_capacity(templates.len());
    for t in templates {
        let result = render_one(t, fetcher, out_dir).await;
        match &result {
            Ok(report) => {
                tracing::info!(template = %report.name, file = %report.file, written = report.written, "rendered")
            }
            Err(e) => {
                tracing::error!(template = %t.config.name, error = %e, "render failed; the previous file is kept")
            }
        }
        results.push(result);
    }
    results
}
