//! The webhook's self-check of a patch before it leaves: applied to the pod's outline, every
//! path must resolve, and no container or volume name may appear twice. A failure is an
//! internal error, never a patch the API server would reject.

use std::collections::BTreeSet;

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use serde_json::Value;

use super::patch::Op;
use crate::pod::{ContainerView, PodView, Section};

/// The pod's outline: its objects and arrays with every leaf left out, which is all a patch's
/// paths can address.
fn outline(pod: &PodView) -> Value {
    use serde_json::Map;
    let nulls = |n: usize| Value::Array(vec![Value::Null; n]);
    let containers = |list: &[ContainerView]| {
        Value::Array(
            list.iter()
                .map(|c| {
                    let mut o = Map::new();
                    if let Some(ms) = &c.volume_mounts {
                        o.insert("volumeMounts".into(), nulls(ms.len()));
                    }
                    // Appended to, and its `vault:` entries replaced.
                    if let Some(env) = &c.env {
                        o.insert("env".into(), nulls(env.len()));
                    }
                    if c.command.is_some() {
                        o.insert("command".into(), Value::Null);
                    }
                    Value::Object(o)
                })
                .collect(),
        )
    };
    let mut doc = Map::new();
    if let Some(meta) = &pod.metadata {
        let mut o = Map::new();
        if let Some(a) = &meta.annotations {
            o.insert(
                "annotations".into(),
                Value::Object(a.0.keys().map(|k| (k.clone(), Value::Null)).collect()),
            );
        }
        doc.insert("metadata".into(), Value::Object(o));
    }
    if let Some(spec) = &pod.spec {
        let mut o = Map::new();
        if let Some(vs) = &spec.volumes {
            o.insert("volumes".into(), nulls(vs.len()));
        }
        for section in [Section::Containers, Section::InitContainers] {
            if let Some(list) = pod.list(section) {
                o.insert(section.key().into(), containers(list));
            }
        }
        doc.insert("spec".into(), Value::Object(o));
    }
    Value::Object(doc)
}

/// Checks what Kubernetes would refuse before the patch leaves the webhook: every path must
/// resolve in the pod as the earlier operations left it (the operations are applied to the
/// pod's outline), and no container or volume name may appear twice. What the patch adds is
/// built from typed k8s-openapi structs, so its shape is right by construction (the fixture
/// and property tests apply every patch to the whole pod and read the result back as a Pod).
pub fn check_patch(pod: &PodView, ops: &[Op]) -> Result<(), String> {
    let mut doc = outline(pod);
    let shaped = Patch(
        ops.iter()
            .map(|op| match op.op {
                "replace" => PatchOperation::Replace(ReplaceOperation {
                    path: op.path.clone(),
                    value: op.value.shape(),
                }),
                _ => PatchOperation::Add(AddOperation {
                    path: op.path.clone(),
                    value: op.value.shape(),
                }),
            })
            .collect(),
    );
    json_patch::patch(&mut doc, &shaped).map_err(|e| format!("the patch does not apply: {e}"))?;
    let mut containers: BTreeSet<&str> = BTreeSet::new();
    for name in pod
        .names(Section::InitContainers)
        .chain(pod.names(Section::Containers))
        .filter(|n| !n.is_empty())
        .chain(ops.iter().flat_map(|op| op.value.container_names()))
    {
        if !containers.insert(name) {
            return Err(format!("the patched pod has two containers named {name:?}"));
        }
    }
    let mut volumes: BTreeSet<&str> = BTreeSet::new();
    for name in pod
        .volumes()
        .into_iter()
        .flatten()
        .map(|v| v.name.as_str())
        .filter(|n| !n.is_empty())
        .chain(ops.iter().flat_map(|op| op.value.volume_names()))
    {
        if !volumes.insert(name) {
            return Err(format!("the patched pod has two volumes named {name:?}"));
        }
    }
    Ok(())
}
