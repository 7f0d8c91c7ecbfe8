//! The bounds every template stays within. Template text is an annotation any pod author writes,
//! and the injector parses it for the whole cluster on small worker-thread stacks (2 MiB, tokio's
//! default), so no text may exhaust the stack, the memory or the time of the injector or of an
//! agent. Each bound is far above what real templates use; crossing one is a `Limit` error that
//! names the bound and its value.

/// The largest template text, in bytes. Kubernetes caps all of a pod's annotations together at
/// 256 KiB, so no template that an admitted pod carries is larger.
pub const MAX_TEMPLATE_BYTES: usize = 256 * 1024;

/// How deep blocks (`if`, `range`, `with`, `define`, `block`, each `else if`/`else with`
/// branch, handlebars `{{#…}}`) and parentheses may nest, counted together. Real templates stay
/// under ten; at this depth the Go parser needs under 1 MiB of stack even in a debug build.
pub const MAX_NESTING: usize = 100;

/// How deep rendering may go: nested blocks plus `template` calls (a template calling itself
/// recurses once per call). Go allows 100,000 calls, on stacks that grow; ours do not (at this
/// depth rendering needs under 1 MiB of stack even in a debug build).
pub const MAX_RENDER_DEPTH: usize = 200;

/// The evaluation steps (nodes, range iterations, function calls) one rendering pass may take.
pub const MAX_STEPS: u64 = 1_000_000;

/// The text one rendering pass may build: its output plus every string a function returns.
/// A pod's agent has 64 MiB of memory by default.
pub const MAX_TEXT_BYTES: usize = 16 * 1024 * 1024;

/// A bound a template went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error("is {size} bytes, over the limit of {limit} bytes for a template")]
    Size { size: usize, limit: usize },
    #[error(
        "nests deeper than the limit of {limit} levels at line {line} (blocks and parentheses count together)"
    )]
    Nesting { limit: usize, line: usize },
    #[error(
        "renders deeper than the limit of {limit} levels (nested blocks and template calls count together)"
    )]
    RenderDepth { limit: usize },
    #[error("takes more than the limit of {limit} steps to render")]
    Steps { limit: u64 },
    #[error("builds more than the limit of {limit} bytes of text")]
    Text { limit: usize },
}

/// The size check both engines make before parsing.
pub fn check_size(text: &str) -> Result<(), Limit> {
    if text.len() > MAX_TEMPLATE_BYTES {
        return Err(Limit::Size {
            size: text.len(),
            limit: MAX_TEMPLATE_BYTES,
        });
    }
    Ok(())
}
