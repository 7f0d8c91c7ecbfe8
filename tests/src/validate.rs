//! `kubernetes-validate --strict`: the Kubernetes API's own schemas, for the chart's renders.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workspace_root;

/// Validates every object of `renders` (a label and its objects) against one Kubernetes
/// version; fails unless each object is reported as passed.
pub fn kubernetes_validate(renders: &[(String, Vec<Value>)], version: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    let mut expected = 0;
    for (i, (label, docs)) in renders.iter().enumerate() {
        if docs.is_empty() {
            bail!("{label}: nothing to validate");
        }
        expected += docs.len();
        // JSON is YAML: one document per object.
        let text: String = docs.iter().map(|d| format!("---\n{d}\n")).collect();
        let file = dir.path().join(format!("render-{i}.yaml"));
        std::fs::write(&file, text)?;
        files.push(file);
    }
    // The stack's copy when scripts/stack-install.sh put one there, else the one on PATH.
    let stack_copy = workspace_root().join(".stack/bin/kubernetes-validate");
    let program = if stack_copy.is_file() {
        stack_copy
    } else {
        "kubernetes-validate".into()
    };
    let out = Command::new(&program)
        .args(["--strict", "--kubernetes-version", version])
        .args(&files)
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (pip install kubernetes-validate)",
                program.display()
            )
        })?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "kubernetes-validate {version} exited {}:\n{report}",
            out.status
        );
    }
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    if passed != expected {
        bail!("kubernetes-validate {version} passed {passed} of {expected} objects:\n{report}");
    }
    Ok(())
}
