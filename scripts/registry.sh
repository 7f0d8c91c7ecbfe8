#!/usr/bin/env bash
# A real OCI registry for the tests and the demo: Debian's docker-registry (the CNCF distribution
# registry) on the cluster's host address, over TLS with a CA of its own, which the node's
# containerd and this machine's skopeo/helm trust. It also makes the sigstore key pair the images
# are signed with (cosign, built from its Go module once per machine), and makes the node refuse
# an image of the registry's `sidekey/` repositories that the key did not sign.
#
#   ./scripts/registry.sh up     # start it (idempotent); prints export lines (REGISTRY, ...)
#   ./scripts/registry.sh env    # the same export lines, without starting anything
#   ./scripts/registry.sh down   # stop it (its data, keys and CA stay in /var/lib/sidekey-registry)
#
# The exports: REGISTRY (10.200.0.1:5000/sidekey, where the images and the chart go),
# REGISTRY_CA (its CA, for helm's --ca-file and cosign's SSL_CERT_FILE), SIGNING_KEY,
# SIGNING_PASSPHRASE_FILE and SIGNING_PUBKEY (the cosign key pair), COSIGN (the binary).
#
# Why cosign and not skopeo/podman for signatures: Debian 12 builds containers/image with
# sigstore disabled; `skopeo copy --sign-by-sigstore-private-key` fails with "creating signature:
# Debian-local change: sigstore disabled", and a `sigstoreSigned` policy rejects every image with
# "Source image rejected: Debian-local change: sigstore disabled". cosign writes and reads the
# same signatures (the `sha256-<digest>.sig` tag beside the image), offline.
#
# The node refuses an unsigned or altered image from the registry: containerd 2.x pulls CRI images
# through its transfer service, which asks every executable in the image-verifier folder
# (scripts/cluster.sh configures it) before it pulls; the one written here runs `cosign verify`
# with the public key against the digest containerd resolved, and its last line is the refusal's
# reason, which the kubelet shows in the pod's events.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${SIDEKEY_REGISTRY_DIR:-/var/lib/sidekey-registry}
run=/run/sidekey-registry
cluster_state=${SIDEKEY_CLUSTER_DIR:-/var/lib/sidekey-cluster}
host_ip=10.200.0.1
port=5000
addr=$host_ip:$port
COSIGN_VERSION=v2.6.5
cosign_dir=$HOME/.cache/sidekey/cosign-$COSIGN_VERSION

log() { printf '[registry] %s\n' "$*" >&2; }
fail() { log "error: $*"; exit 1; }

env_lines() {
  echo "export REGISTRY=$addr/sidekey"
  echo "export REGISTRY_CA=$state/pki/ca.crt"
  echo "export SIGNING_KEY=$state/keys/sidekey.key"
  echo "export SIGNING_PASSPHRASE_FILE=$state/keys/passphrase"
  echo "export SIGNING_PUBKEY=$state/keys/sidekey.pub"
  echo "export COSIGN=$cosign_dir/cosign"
}

pid_alive() { [ -f "$run/registry.pid" ] && kill -0 "$(cat "$run/registry.pid")" 2>/dev/null; }

packages() {
  local missing=()
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  command -v skopeo >/dev/null || missing+=(skopeo)
  command -v openssl >/dev/null || missing+=(openssl)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
      fail "apt-get install ${missing[*]} failed"
  fi
}

# cosign, only to make the key pair (skopeo 1.9 signs and verifies, but cannot make keys). Built
# from its Go module once per machine, cached by version.
cosign_bin() {
  if [ ! -x "$cosign_dir/cosign" ]; then
    log "building cosign $COSIGN_VERSION from its Go module (once per machine, a few minutes)"
    mkdir -p "$cosign_dir"
    (cd /tmp && GOBIN=$cosign_dir GOFLAGS=-trimpath go install "github.com/sigstore/cosign/v2/cmd/cosign@$COSIGN_VERSION") ||
      fail "go install github.com/sigstore/cosign/v2/cmd/cosign@$COSIGN_VERSION failed"
  fi
}

pki() {
  mkdir -p "$state/pki"
  if [ ! -f "$state/pki/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$state/pki/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$state/pki/ca.key" -days 3650 -subj "/CN=sidekey-test-registry-ca" \
      -out "$state/pki/ca.crt" 2>/dev/null
  fi
  if [ ! -f "$state/pki/registry.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$state/pki/registry.key" 2>/dev/null
    openssl req -new -key "$state/pki/registry.key" -subj "/CN=$host_ip" -out "$state/pki/registry.csr" 2>/dev/null
    printf 'keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:%s\n' "$host_ip" \
      >"$state/pki/registry.ext"
    openssl x509 -req -in "$state/pki/registry.csr" -CA "$state/pki/ca.crt" -CAkey "$state/pki/ca.key" \
      -CAcreateserial -days 3650 -extfile "$state/pki/registry.ext" -out "$state/pki/registry.crt" 2>/dev/null
    rm -f "$state/pki/registry.csr" "$state/pki/registry.ext"
  fi
}

keys() {
  mkdir -p "$state/keys"
  chmod 0700 "$state/keys"
  [ -f "$state/keys/sidekey.key" ] && return 0
  cosign_bin
  head -c 24 /dev/urandom | base64 | tr -d '\n' >"$state/keys/passphrase"
  chmod 0600 "$state/keys/passphrase"
  (cd "$state/keys" && COSIGN_PASSWORD=$(cat passphrase) "$cosign_dir/cosign" generate-key-pair \
    --output-key-prefix sidekey >/dev/null 2>&1) || fail "cosign generate-key-pair failed"
}

# The machine's trust for skopeo, podman and buildah (/etc/containers/certs.d).
containers_config() {
  mkdir -p "/etc/containers/certs.d/$addr"
  cp "$state/pki/ca.crt" "/etc/containers/certs.d/$addr/ca.crt"
  rm -f /etc/containers/registries.d/sidekey-test-registry.yaml "$state/policy.json"
}

# The node: containerd's hosts folder for the registry, and the verifier.
node_config() {
  local hosts="$cluster_state/containerd/certs.d/$addr" verifiers="$cluster_state/image-verifier/bin"
  [ -d "$cluster_state/containerd/certs.d" ] || fail "$cluster_state/containerd/certs.d is missing: run ./scripts/cluster.sh up first"
  mkdir -p "$hosts" "$verifiers"
  cp "$state/pki/ca.crt" "$hosts/ca.crt"
  cat >"$hosts/hosts.toml" <<EOF
server = "https://$addr"

[host."https://$addr"]
  capabilities = ["pull", "resolve"]
  ca = "$hosts/ca.crt"
EOF
  # Written to a temporary name and renamed: containerd may run the folder's files at any time.
  cat >"$verifiers/.sidekey-signature.tmp" <<EOF
#!/bin/sh
# containerd image verifier (scripts/registry.sh): a pull from $addr/sidekey/ goes ahead only when
# the digest containerd resolved carries a signature by $state/keys/sidekey.pub (cosign, offline).
name= digest=
while [ \$# -gt 0 ]; do
  case \$1 in
    -name) name=\$2; shift 2 ;;
    -digest) digest=\$2; shift 2 ;;
    *) shift ;;
  esac
done
cat >/dev/null
case \$name in
  $addr/sidekey/*) ;;
  *) echo "\$name is outside $addr/sidekey/, which must be signed"; exit 0 ;;
esac
repo=\${name%@*}
last=\${repo##*/}
case \$last in *:*) repo=\${repo%:*} ;; esac
if out=\$(SSL_CERT_FILE=$state/pki/ca.crt $cosign_dir/cosign verify --key $state/keys/sidekey.pub \\
    --insecure-ignore-tlog=true --offline=true "\$repo@\$digest" 2>&1); then
  echo "\$repo@\$digest is signed by $state/keys/sidekey.pub"
  exit 0
fi
reason=\$(printf '%s\n' "\$out" | grep '^Error' | tail -n 1)
echo "refused: \$repo@\$digest has no valid signature by $state/keys/sidekey.pub: \${reason:-\$(printf '%s\n' "\$out" | tail -n 1)}"
exit 1
EOF
  chmod 0755 "$verifiers/.sidekey-signature.tmp"
  mv "$verifiers/.sidekey-signature.tmp" "$verifiers/sidekey-signature"
  rm -f "$verifiers/sidekey-signature-policy"
}

serve() {
  mkdir -p "$state/data" "$run"
  cat >"$state/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $state/data
  delete:
    enabled: true
http:
  addr: $addr
  tls:
    certificate: $state/pki/registry.crt
    key: $state/pki/registry.key
EOF
  pid_alive && return 0
  ip -o addr show | grep -q " $host_ip/" || fail "$host_ip is not an address of this machine: run ./scripts/cluster.sh up first"
  setsid docker-registry serve "$state/config.yml" >>"$state/registry.log" 2>&1 </dev/null &
  echo $! >"$run/registry.pid"
  local deadline=$((SECONDS + 30))
  until curl -fsS --cacert "$state/pki/ca.crt" "https://$addr/v2/" >/dev/null 2>&1; do
    pid_alive || { tail -n 20 "$state/registry.log" >&2; fail "docker-registry exited"; }
    [ $SECONDS -lt $deadline ] || fail "the registry did not answer at https://$addr/v2/ within 30 s"
    sleep 0.2
  done
}

up() {
  [ "$(id -u)" = 0 ] || fail "run as root: the registry's trust goes into /etc/containers and the node's containerd"
  packages
  pki
  keys
  containers_config
  node_config
  serve
  env_lines
}

down() {
  if pid_alive; then kill "$(cat "$run/registry.pid")"; fi
  rm -f "$run/registry.pid"
}

lock() {
  mkdir -p "$state"
  exec 9>"$state/.lock"
  flock 9
}

case "${1:-}" in
  up) lock; up ;;
  down) lock; down ;;
  env) env_lines ;;
  # Only the cosign build (the slow part of a machine's first `up`), for scripts/test.sh to run
  # in the background while other tests run.
  cosign) cosign_bin ;;
  *) echo "usage: $0 up|down|env|cosign" >&2; exit 2 ;;
esac
