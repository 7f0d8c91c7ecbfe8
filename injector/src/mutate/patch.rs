//! From a `Mutation` to the JSON patch the admission answer carries: `add` operations whose
//! values borrow the typed containers and volumes, serialized once when the answer is written.
//! Arrays the pod lacks are created, existing ones appended to.

use std::collections::BTreeSet;

use json_patch::Patch;
use json_patch::jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, EnvVar, Volume, VolumeMount};
use serde::Serialize;
use serde_json::Value;

use super::Mutation;
use crate::pod::{PodView, Section};

pub(super) fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

/// One `add` operation of the patch. Values borrow from the `Mutation` and are serialized
/// straight from the typed structs, once, when the answer is written.
#[derive(Debug, Clone, Serialize)]
pub struct Op<'a> {
    pub(super) op: &'static str,
    pub path: PointerBuf,
    pub value: Added<'a>,
}

pub(super) fn add<'a>(path: PointerBuf, value: Added<'a>) -> Op<'a> {
    Op {
        op: "add",
        path,
        value,
    }
}

/// A `replace` of what the pod has at `path` (a `vault:` env entry, a wrapped command).
pub(super) fn replace<'a>(path: PointerBuf, value: Added<'a>) -> Op<'a> {
    Op {
        op: "replace",
        path,
        value,
    }
}

/// What an operation adds.
#[derive(Debug, Clone, Copy)]
pub enum Added<'a> {
    Volumes(&'a [Volume]),
    Volume(&'a Volume),
    Mounts(&'a [VolumeMount]),
    Mount(&'a VolumeMount),
    Containers(&'a [Container]),
    Container(&'a Container),
    Envs(&'a [EnvVar]),
    Env(&'a EnvVar),
    /// A container's command.
    Command(&'a [String]),
    Flag(bool),
    /// The status annotation's value.
    Status,
    /// A new annotations map holding only the status key.
    Annotations(&'a str),
    /// A new metadata object holding only the annotations map.
    Metadata(&'a str),
}

const STATUS: &str = "injected";

impl Serialize for Added<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match *self {
            Added::Volumes(v) => v.serialize(s),
            Added::Volume(v) => v.serialize(s),
            Added::Mounts(v) => v.serialize(s),
            Added::Mount(v) => v.serialize(s),
            Added::Containers(v) => v.serialize(s),
            Added::Container(v) => v.serialize(s),
            Added::Envs(v) => v.serialize(s),
            Added::Env(v) => v.serialize(s),
            Added::Command(v) => v.serialize(s),
            Added::Flag(b) => s.serialize_bool(b),
            Added::Status => s.serialize_str(STATUS),
            Added::Annotations(key) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(key, STATUS)?;
                map.end()
            }
            Added::Metadata(key) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("annotations", &Added::Annotations(key))?;
                map.end()
            }
        }
    }
}

impl Added<'_> {
    /// The same structure with the leaves left out: what later operations could address.
    pub(super) fn shape(&self) -> Value {
        let nulls = |n: usize| Value::Array(vec![Value::Null; n]);
        match *self {
            Added::Volumes(v) => nulls(v.len()),
            Added::Mounts(v) => nulls(v.len()),
            Added::Containers(v) => nulls(v.len()),
            Added::Envs(v) => nulls(v.len()),
            Added::Annotations(key) => serde_json::json!({ key: null }),
            Added::Metadata(key) => serde_json::json!({ "annotations": { key: null } }),
            _ => Value::Null,
        }
    }

    pub(super) fn container_names(&self) -> Vec<&str> {
        match self {
            Added::Containers(cs) => cs.iter().map(|c| c.name.as_str()).collect(),
            Added::Container(c) => vec![c.name.as_str()],
            _ => Vec::new(),
        }
    }

    pub(super) fn volume_names(&self) -> Vec<&str> {
        match self {
            Added::Volumes(vs) => vs.iter().map(|v| v.name.as_str()).collect(),
            Added::Volume(v) => vec![v.name.as_str()],
            _ => Vec::new(),
        }
    }
}

/// The JSON patch that applies `m` to the pod. Arrays that are missing are created; existing
/// ones are appended to; the annotation key is escaped by the pointer type.
pub fn to_patch<'a>(pod: &PodView, m: &'a Mutation) -> Vec<Op<'a>> {
    let mut ops = Vec::new();

    // Volumes.
    if pod.volumes().is_some() {
        for v in &m.volumes {
            ops.push(add(ptr(&["spec", "volumes", "-"]), Added::Volume(v)));
        }
    } else {
        ops.push(add(ptr(&["spec", "volumes"]), Added::Volumes(&m.volumes)));
    }

    // Mounts into existing containers (before any container is inserted, so indices hold).
    let mut created: BTreeSet<(Section, usize)> = BTreeSet::new();
    for (section, i, mount) in &m.mounts {
        let index = i.to_string();
        let has_mounts = pod
            .containers(*section)
            .get(*i)
            .is_some_and(|c| c.volume_mounts.is_some())
            || created.contains(&(*section, *i));
        if has_mounts {
            ops.push(add(
                ptr(&["spec", section.key(), &index, "volumeMounts", "-"]),
                Added::Mount(mount),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", section.key(), &index, "volumeMounts"]),
                Added::Mounts(std::slice::from_ref(mount)),
            ));
            created.insert((*section, *i));
        }
    }

    // `vault:` entries pointed at the env file, and wrapped commands (exec mode).
    for (i, j, var) in &m.env.replaced {
        ops.push(replace(
            ptr(&["spec", "containers", &i.to_string(), "env", &j.to_string()]),
            Added::Env(var),
        ));
    }
    for (i, command) in &m.env.commands {
        ops.push(replace(
            ptr(&["spec", "containers", &i.to_string(), "command"]),
            Added::Command(command),
        ));
    }

    // The marks of containers a `restart:` action names, and the variables from the env file
    // (before the sidecar is appended).
    let mut env_created: BTreeSet<usize> = BTreeSet::new();
    for (i, var) in m.markers.iter().chain(&m.env.added) {
        let index = i.to_string();
        let has_env = pod
            .containers(Section::Containers)
            .get(*i)
            .is_some_and(|c| c.env.is_some())
            || env_created.contains(i);
        if has_env {
            ops.push(add(
                ptr(&["spec", "containers", &index, "env", "-"]),
                Added::Env(var),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", "containers", &index, "env"]),
                Added::Envs(std::slice::from_ref(var)),
            ));
            env_created.insert(*i);
        }
    }

    // The init container, then the guard right after it.
    let agents_in_init: Vec<&Container> = m.init_container.iter().chain(&m.guard).collect();
    let mut list_exists = pod.list(Section::InitContainers).is_some();
    let front = m.init_first
        && pod
            .list(Section::InitContainers)
            .is_some_and(|l| !l.is_empty());
    for (i, container) in agents_in_init.into_iter().enumerate() {
        if !list_exists {
            ops.push(add(
                ptr(&["spec", "initContainers"]),
                Added::Containers(std::slice::from_ref(container)),
            ));
            list_exists = true;
        } else if front {
            ops.push(add(
                ptr(&["spec", "initContainers", &i.to_string()]),
                Added::Container(container),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", "initContainers", "-"]),
                Added::Container(container),
            ));
        }
    }
    if let Some(sidecar) = &m.sidecar {
        if pod.list(Section::Containers).is_some() {
            ops.push(add(
                ptr(&["spec", "containers", "-"]),
                Added::Container(sidecar),
            ));
        } else {
            ops.push(add(
                ptr(&["spec", "containers"]),
                Added::Containers(std::slice::from_ref(sidecar)),
            ));
        }
    }
    if m.share_process_namespace {
        ops.push(add(
            ptr(&["spec", "shareProcessNamespace"]),
            Added::Flag(true),
        ));
    }

    match &pod.metadata {
        None => ops.push(add(ptr(&["metadata"]), Added::Metadata(&m.status_key))),
        Some(meta) if meta.annotations.is_none() => ops.push(add(
            ptr(&["metadata", "annotations"]),
            Added::Annotations(&m.status_key),
        )),
        Some(_) => ops.push(add(
            ptr(&["metadata", "annotations", &m.status_key]),
            Added::Status,
        )),
    }
    ops
}

/// The patch as the bytes the answer carries.
pub fn encode_patch(ops: &[Op]) -> Vec<u8> {
    serde_json::to_vec(ops).expect("patches serialize")
}

/// The patch as a `json_patch::Patch`, for applying it to a pod's JSON.
pub fn json_patch(ops: &[Op]) -> Patch {
    serde_json::from_slice(&encode_patch(ops)).expect("a patch reads back")
}
