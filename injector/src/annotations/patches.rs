//! The patches group: a user's RFC 6902 JSON patches on the generated agent containers
//! (`agent-init-json-patch` for the init container, `agent-json-patch` for the others), checked
//! to be JSON patches here and applied when the containers are built.

use serde_json::Value;

use super::AnnotationError;
use super::lookup::Lookup;

/// The users' patches, as given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patches {
    /// `agent-init-json-patch`.
    pub init: Option<Value>,
    /// `agent-json-patch`: the sidecar, the native sidecar and the guard.
    pub sidecar: Option<Value>,
}

/// Reads the patches group.
pub(super) fn parse(look: &Lookup<'_>) -> Result<Patches, AnnotationError> {
    Ok(Patches {
        init: json_patch_of(look, "agent-init-json-patch")?,
        sidecar: json_patch_of(look, "agent-json-patch")?,
    })
}

fn json_patch_of(look: &Lookup<'_>, suffix: &str) -> Result<Option<Value>, AnnotationError> {
    let Some(text) = look.nonempty(suffix) else {
        return Ok(None);
    };
    let value: Value =
        serde_json::from_str(&text).map_err(|e| look.error(suffix, format!("is not JSON: {e}")))?;
    serde_json::from_value::<json_patch::Patch>(value.clone())
        .map_err(|e| look.error(suffix, format!("is not a JSON patch: {e}")))?;
    Ok(Some(value))
}
