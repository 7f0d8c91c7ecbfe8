//! The injector's settings as the running install has them: its Deployment's `SIDEKEY_INJECTOR_*`
//! variables and arguments, read through the injector's own flag definitions, so the decision
//! computed here is the one the running injector makes.

use clap::{CommandFactory, FromArgMatches};
use serde_json::Value;
use sidekey_injector::config::{Defaults, Flags};

/// The injector container of a Deployment (the one whose environment holds `SIDEKEY_INJECTOR_*`,
/// or the first).
fn injector_container(deployment: &Value) -> Option<&Value> {
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_array()?;
    containers
        .iter()
        .find(|c| {
            c["env"].as_array().is_some_and(|env| {
                env.iter().any(|e| {
                    e["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("SIDEKEY_INJECTOR_"))
                })
            })
        })
        .or(containers.first())
}

/// The injector's defaults from its Deployment. Variables set from elsewhere (`valueFrom`) are
/// left out: none of them is an annotation default.
pub fn defaults_from_deployment(deployment: &Value) -> Result<Defaults, String> {
    let Some(container) = injector_container(deployment) else {
        return Err("the injector Deployment has no containers".into());
    };
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_string(),
                        e["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let args: Vec<String> = container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    defaults_from(&env, &args)
}

/// The defaults a `sidekey-injector` started with these variables and arguments has, whatever
/// this process's own environment holds. Arguments win over variables, as clap gives them.
pub fn defaults_from(env: &[(String, String)], args: &[String]) -> Result<Defaults, String> {
    let command = Flags::command();
    let mut argv = vec!["sidekey-injector".to_string()];
    for arg in command.get_arguments() {
        let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let given = args
            .iter()
            .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
        if given {
            continue;
        }
        if let Some((_, value)) = env.iter().rev().find(|(name, _)| var == name.as_str()) {
            argv.push(format!("--{long}={value}"));
        }
    }
    argv.extend(args.iter().cloned());
    let matches = command
        .mut_args(|a| a.env(None))
        .try_get_matches_from(argv)
        .map_err(|e| format!("the injector's settings do not parse: {}", first_line(&e)))?;
    let flags = Flags::from_arg_matches(&matches)
        .map_err(|e| format!("the injector's settings do not parse: {}", first_line(&e)))?;
    Ok(flags.defaults)
}

fn first_line(e: &clap::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_deployments_variables_and_arguments_become_the_defaults() {
        let deployment = json!({ "spec": { "template": { "spec": { "containers": [{
            "name": "injector",
            "args": ["--agent-init-timeout", "30"],
            "env": [
                { "name": "SIDEKEY_INJECTOR_VAULT_ADDRESS", "value": "https://bao:8200" },
                { "name": "SIDEKEY_INJECTOR_SKIP_NAMESPACES", "value": "kube-system,legacy" },
                { "name": "SIDEKEY_INJECTOR_ANNOTATION_PREFIX", "value": "secrets.example.com" },
                { "name": "SIDEKEY_INJECTOR_AGENT_INIT_TIMEOUT", "value": "99" },
                { "name": "SIDEKEY_INJECTOR_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            ],
        }] } } } });
        let d = defaults_from_deployment(&deployment).unwrap();
        assert_eq!(d.vault_address, "https://bao:8200");
        assert_eq!(d.skip_namespaces, ["kube-system", "legacy"]);
        assert_eq!(d.annotation_prefix, "secrets.example.com");
        assert_eq!(d.agent_init_timeout, 30, "an argument wins over a variable");
        // What the Deployment does not set is the injector's own default.
        assert_eq!(d.memory_limit, Defaults::default().memory_limit);
        let bad = json!({ "spec": { "template": { "spec": { "containers": [{
            "env": [{ "name": "SIDEKEY_INJECTOR_REVOKE_GRACE", "value": "soon" }],
        }] } } } });
        let e = defaults_from_deployment(&bad).unwrap_err();
        assert!(e.contains("--revoke-grace") && e.contains("soon"), "{e}");
    }
}
