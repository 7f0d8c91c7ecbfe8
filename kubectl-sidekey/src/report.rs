//! How `why` prints: the first line names the first thing wrong (or says all is well), then
//! every step of the path with its verdict and details.

use crate::diagnose::{Finding, Verdict, headline};

fn marker(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "ok   ",
        Verdict::Warn => "warn ",
        Verdict::Wrong => "WRONG",
        Verdict::Unchecked => "--   ",
    }
}

/// The whole answer.
pub fn format(subject: &str, findings: &[Finding]) -> String {
    let mut out = headline(subject, findings);
    out.push_str("\n\n");
    for f in findings {
        out.push_str(&format!("  {} {}\n", marker(f.verdict), f.summary));
        for d in &f.details {
            out.push_str(&format!("        {d}\n"));
        }
    }
    out
}

/// Whether the answer found something wrong (the exit code is 1 then).
pub fn is_wrong(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.verdict == Verdict::Wrong)
}
