//! Test apps for the real cluster, made of the node's busybox image: each records what reached it
//! in files under /tmp/app of its container (`count`, the number of actions so far, and
//! `seen-N`, a copy of /vault/secrets/config when action N arrived), which the tests and the
//! benchmark read with `kubectl exec`.

use serde_json::{Value, json};

use crate::cluster::APP_IMAGE;

/// The user such an app (and, with `agent-run-as-same-user`, its agent) runs as.
pub const APP_USER: u32 = 4321;

/// The process name of the apps below: what a `signal:HUP:orders-app` action looks for.
pub const APP_PROCESS: &str = "orders-app";

/// On each SIGHUP, counts and keeps a copy of the file it sees.
pub const SIGNALLED: &str = r#"n=0
on_hup() { n=$((n+1)); cp /vault/secrets/config /tmp/app/seen-$n; echo $n > /tmp/app/count; }
trap on_hup HUP
trap 'exit 0' TERM
while true; do sleep 1 & wait $!; done"#;

/// busybox httpd on 127.0.0.1:8080, whose CGI script `/cgi-bin/reload` counts the calls and
/// keeps a copy of the file (and the request's method in `method-N`) at each.
pub const RELOADED: &str = r#"mkdir -p /tmp/www/cgi-bin
cat > /tmp/www/cgi-bin/reload <<'EOC'
#!/bin/sh
n=$(( $(cat /tmp/app/count 2>/dev/null || echo 0) + 1 ))
cp /vault/secrets/config /tmp/app/seen-$n
echo "$REQUEST_METHOD" > /tmp/app/method-$n
echo $n > /tmp/app/count
printf 'Content-Type: text/plain\r\n\r\nreloaded %s\n' "$n"
EOC
chmod +x /tmp/www/cgi-bin/reload
exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"#;

/// The reload URL of [`RELOADED`].
pub const RELOAD_URL: &str = "http://127.0.0.1:8080/cgi-bin/reload";

/// Container `app` running `script` as [`APP_PROCESS`], with [`scratch_volume`] at /tmp (written to a file with a `#!/bin/sh`
/// line and run from it, so that the kernel names the process after the file, as it names a
/// real app after its binary), as [`APP_USER`].
pub fn container(script: &str) -> Value {
    let setup = format!(
        "mkdir -p /tmp/app && cat > /tmp/app/{APP_PROCESS} <<'EOS'\n#!/bin/sh\n{script}\nEOS\nchmod +x /tmp/app/{APP_PROCESS} && exec /tmp/app/{APP_PROCESS}"
    );
    json!({
        "name": "app",
        "image": APP_IMAGE,
        "command": ["sh", "-c", setup],
        "securityContext": { "runAsUser": APP_USER, "runAsGroup": APP_USER },
        "volumeMounts": [{ "name": "app-tmp", "mountPath": "/tmp" }],
    })
}

/// The volume [`container`] writes in (the image has no /tmp, and its root is not the app
/// user's): add it to the pod's volumes.
pub fn scratch_volume() -> Value {
    json!({ "name": "app-tmp", "emptyDir": {} })
}

/// The annotations (without their prefix) of a pod that renders field `version` of the KV v2
/// secret `kv` (`secret/data/…`) to /vault/secrets/config every 2 s and runs `action` when it
/// changes, with what the actions need: a shared process namespace and the app's user.
pub fn action_annotations(kv: &str, action: &str) -> Vec<(&'static str, String)> {
    vec![
        ("agent-inject-secret-config", kv.to_string()),
        (
            "agent-inject-template-config",
            format!("{{{{ with secret \"{kv}\" }}}}{{{{ .Data.data.version }}}}{{{{ end }}}}"),
        ),
        ("agent-inject-action-config", action.to_string()),
        ("agent-share-process-namespace", "true".into()),
        ("agent-run-as-same-user", "true".into()),
        // The group too: the agent finds a container's main process by its environment.
        ("agent-run-as-group", APP_USER.to_string()),
        ("template-static-secret-render-interval", "2s".into()),
    ]
}
