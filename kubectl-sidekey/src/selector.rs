//! Kubernetes label selectors (`matchLabels`, `matchExpressions`), as the API server evaluates a
//! webhook's namespaceSelector and objectSelector: every requirement must hold. The answer names
//! the first requirement that does not, so the report can say which term leaves a pod out.

use std::collections::BTreeMap;

use serde_json::Value;

/// The labels of an object (`metadata.labels`), empty when it has none.
pub fn labels(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Ok when `selector` (a LabelSelector as JSON; null or `{}` selects everything) selects
/// `labels`, else the requirement that fails, written as it reads in the selector.
pub fn matches(selector: &Value, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if let Some(wanted) = selector["matchLabels"].as_object() {
        for (key, value) in wanted {
            let value = value.as_str().unwrap_or_default();
            if labels.get(key).map(String::as_str) != Some(value) {
                return Err(format!(
                    "matchLabels {key}={value} (the label is {})",
                    shown(labels.get(key))
                ));
            }
        }
    }
    for expr in selector["matchExpressions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let key = expr["key"].as_str().unwrap_or_default();
        let op = expr["operator"].as_str().unwrap_or_default();
        let values: Vec<&str> = expr["values"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let have = labels.get(key);
        let holds = match op {
            "In" => have.is_some_and(|v| values.contains(&v.as_str())),
            "NotIn" => have.is_none_or(|v| !values.contains(&v.as_str())),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !holds {
            let list = if values.is_empty() {
                String::new()
            } else {
                format!(" [{}]", values.join(", "))
            };
            return Err(format!("{key} {op}{list} (the label is {})", shown(have)));
        }
    }
    Ok(())
}

fn shown(value: Option<&String>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "absent".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_chart_selectors_and_each_operator() {
        let ns_selector = json!({ "matchExpressions": [
            { "key": "kubernetes.io/metadata.name", "operator": "NotIn",
              "values": ["sidekey", "kube-system", "kube-public"] } ] });
        assert_eq!(
            matches(&ns_selector, &l(&[("kubernetes.io/metadata.name", "shop")])),
            Ok(())
        );
        assert_eq!(
            matches(
                &ns_selector,
                &l(&[("kubernetes.io/metadata.name", "kube-public")])
            ),
            Err("kubernetes.io/metadata.name NotIn [sidekey, kube-system, kube-public] (the label is \"kube-public\")".into())
        );
        // No selector selects everything.
        assert_eq!(matches(&Value::Null, &l(&[])), Ok(()));
        assert_eq!(matches(&json!({}), &l(&[])), Ok(()));
        let s = json!({ "matchLabels": { "team": "a" },
                        "matchExpressions": [ { "key": "tier", "operator": "In", "values": ["web"] },
                                              { "key": "legacy", "operator": "DoesNotExist" },
                                              { "key": "owner", "operator": "Exists" } ] });
        assert_eq!(
            matches(&s, &l(&[("team", "a"), ("tier", "web"), ("owner", "x")])),
            Ok(())
        );
        assert_eq!(
            matches(&s, &l(&[("team", "b")])),
            Err("matchLabels team=a (the label is \"b\")".into())
        );
        assert_eq!(
            matches(&s, &l(&[("team", "a"), ("tier", "db")])),
            Err("tier In [web] (the label is \"db\")".into())
        );
        assert_eq!(
            matches(&s, &l(&[("team", "a"), ("tier", "web"), ("legacy", "1")])),
            Err("legacy DoesNotExist (the label is \"1\")".into())
        );
        assert_eq!(
            matches(&s, &l(&[("team", "a"), ("tier", "web")])),
            Err("owner Exists (the label is absent)".into())
        );
    }
}
