#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, built from Go modules (scripts/cluster-build.sh):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and the kubelet, with
# runc (see cluster-build.sh for why it is built too), the CNI plugins and a static pause binary
# (catatonit) from Debian.
#
#   ./scripts/cluster.sh up       # start it (idempotent); the admin kubeconfig's path is the last line
#   ./scripts/cluster.sh down     # stop everything and remove its state (also after a failed up)
#   ./scripts/cluster.sh status   # one line per component
#   ./scripts/cluster.sh env      # prints export lines: KUBECONFIG, the node and host addresses, PATH
#
# The node lives in a network namespace of its own, "sidekey-node", joined to this machine by a veth
# pair: the machine is 10.200.0.1, the node 10.200.0.2 (the kubelet refuses a loopback node IP, and
# test traffic goes only to loopback or to namespaces the tests made). The whole control plane runs
# in that namespace too, as on a kubeadm node; kubectl, helm and the tests reach the API server at
# https://10.200.0.2:6443 from the machine. Pods get 10.244.0.0/24 on a CNI bridge and reach the
# machine (OpenBao, PostgreSQL) at 10.200.0.1.
#
# There is no kube-proxy: the API server reaches webhooks through their Service's EndpointSlices
# (--enable-aggregator-routing), and pods reach the API server through one DNAT rule for the
# `kubernetes` Service's ClusterIP. No other ClusterIP works inside pods.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${SIDEKEY_CLUSTER_DIR:-/var/lib/sidekey-cluster}
run=/run/sidekey-cluster
netns=sidekey-node
node=sidekey-node
host_ip=10.200.0.1
node_ip=10.200.0.2
pod_cidr=10.244.0.0/24
service_cidr=10.96.0.0/16
api=https://$node_ip:6443
pki=$state/pki
logs=$state/logs
kubeconfig=$state/admin.kubeconfig
NS=(nsenter --net=/run/netns/$netns --)

log() { printf '[cluster] %s\n' "$*" >&2; }
fail() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || fail "run as root: the node needs a network namespace, cgroups and mounts"; }

# The Debian packages the node needs.
install_packages() {
  local missing=()
  [ -f /usr/include/seccomp.h ] || missing+=(libseccomp-dev)
  command -v gcc >/dev/null || missing+=(gcc)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  [ -x /usr/bin/catatonit ] || missing+=(catatonit)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v conntrack >/dev/null || missing+=(conntrack)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
      fail "apt-get install ${missing[*]} failed"
  fi
}

pid_alive() { [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

# start NAME COMMAND...: a daemon in the node's network namespace, its log in $logs/NAME.log.
start() {
  local name=$1
  shift
  if pid_alive "$name"; then return 0; fi
  # Holding no descriptor of the caller's beyond the standard three: a daemon outlives this
  # script, and an inherited lock (this script's fd 9, or a `flock` a caller runs it under)
  # would be held for as long as the daemon runs.
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done
    exec setsid "${NS[@]}" "$@" >>"$logs/$name.log" 2>&1 </dev/null
  ) &
  echo $! >"$run/$name.pid"
}

# wait_for WHAT SECONDS LOGNAME COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 secs=$2 name=$3
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$name" ] && ! pid_alive "$name"; then
      log "$name exited while waiting for $what; last lines of $logs/$name.log:"
      tail -n 20 "$logs/$name.log" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "timed out after ${secs}s waiting for $what${name:+; last lines of $logs/$name.log:}"
      [ -n "$name" ] && tail -n 20 "$logs/$name.log" >&2
      exit 1
    fi
    sleep 0.5
  done
}

network_up() {
  if [ ! -e /run/netns/$netns ]; then
    ip netns add $netns
  fi
  if ! ip link show sk-host >/dev/null 2>&1; then
    ip link add sk-host type veth peer name sk-node0
    ip link set sk-node0 netns $netns
    ip addr add $host_ip/24 dev sk-host
    ip link set sk-host up
    ip -n $netns addr add $node_ip/24 dev sk-node0
    ip -n $netns link set sk-node0 up
    ip -n $netns link set lo up
    ip -n $netns route add default via $host_ip
  fi
  ip route replace $pod_cidr via $node_ip dev sk-host
  "${NS[@]}" sysctl -qw net.ipv4.ip_forward=1
  "${NS[@]}" sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  # Pods reach the API server at the `kubernetes` Service's ClusterIP (their in-cluster config).
  if ! "${NS[@]}" iptables -t nat -C PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination $node_ip:6443 2>/dev/null; then
    "${NS[@]}" iptables -t nat -A PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination $node_ip:6443
    "${NS[@]}" iptables -t nat -A OUTPUT -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination $node_ip:6443
  fi
}

# leaf NAME SUBJECT EKU SANS
leaf() {
  [ -f "$pki/$1.crt" ] && return 0
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$1.key" 2>/dev/null
  openssl req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
  {
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$3"
    [ -n "$4" ] && echo "subjectAltName=$4"
  } >"$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
  rm -f "$pki/$1.csr" "$pki/$1.ext"
}

pki_up() {
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -days 3650 -subj "/CN=sidekey-cluster-ca" -out "$pki/ca.crt" 2>/dev/null
  fi
  leaf apiserver "/CN=kube-apiserver" serverAuth \
    "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1,IP:$node_ip"
  leaf admin "/O=system:masters/CN=sidekey-admin" clientAuth ""
  leaf kcm "/CN=system:kube-controller-manager" clientAuth ""
  leaf scheduler "/CN=system:kube-scheduler" clientAuth ""
  leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth ""
  leaf kubelet "/O=system:nodes/CN=system:node:$node" clientAuth ""
  leaf kubelet-serving "/CN=$node" serverAuth "DNS:$node,IP:$node_ip"
  [ -f "$pki/sa.key" ] || {
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  }
  kubeconfig_for admin "$kubeconfig"
  kubeconfig_for kcm "$state/kcm.kubeconfig"
  kubeconfig_for scheduler "$state/scheduler.kubeconfig"
  kubeconfig_for kubelet "$state/kubelet.kubeconfig"
}

kubeconfig_for() {
  cat >"$2" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sidekey
  cluster:
    server: $api
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$1.crt")
    client-key-data: $(base64 -w0 <"$pki/$1.key")
contexts:
- name: sidekey
  context: {cluster: sidekey, user: $1}
current-context: sidekey
EOF
  chmod 600 "$2"
}

containerd_config() {
  mkdir -p "$state/cni/net.d" "$state/containerd"
  cat >"$state/cni/net.d/10-sidekey.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "sidekey", "plugins": [
  {"type": "bridge", "bridge": "sk-cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$state/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  mkdir -p "$state/containerd/certs.d" "$state/image-verifier/bin"
  cat >"$1" <<EOF
version = 3
root = "$state/containerd/root"
state = "$run/containerd"
[grpc]
  address = "$run/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "sidekey.local/pause:1"
  # Registries the node pulls from: one folder per host with its hosts.toml and CA
  # (scripts/registry.sh writes the test registry's).
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "$state/containerd/certs.d"
# Image pulls through the transfer service (the CRI's default in containerd 2.x) ask every
# executable in this folder first; an empty folder allows every pull (scripts/registry.sh puts a
# signature verifier there).
[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = "$state/image-verifier/bin"
  max_verifiers = 10
  per_verifier_timeout = "30s"
[plugins.'io.containerd.cri.v1.runtime']
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  # This machine runs us without CAP_SYS_RESOURCE: no container's oom_score_adj below ours.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$bin/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$state/cni/net.d"
EOF
}

kubelet_config() {
  cat >"$state/resolv.conf" <<EOF
nameserver $host_ip
options ndots:1
EOF
  cat >"$state/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$run/containerd.sock
address: $node_ip
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: $state/resolv.conf
failSwapOn: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%"}
serializeImagePulls: false
maxPods: 400
syncFrequency: 10s
protectKernelDefaults: false
EOF
}

# A one-file image with the static pause binary, and a busybox image for test and demo apps,
# imported into the node's containerd under registry-qualified names.
node_images() {
  local have
  have=$("${NS[@]}" "$bin/ctr" -a "$run/containerd.sock" -n k8s.io images ls -q 2>/dev/null || true)
  local img
  for img in pause busybox; do
    if grep -qx "sidekey.local/$img:1" <<<"$have"; then continue; fi
    local c tar="$state/$img.tar"
    c=$(buildah --storage-driver vfs from scratch)
    if [ $img = pause ]; then
      buildah --storage-driver vfs copy "$c" /usr/bin/catatonit /pause >/dev/null
      buildah --storage-driver vfs config --entrypoint '["/pause","-P"]' "$c"
    else
      buildah --storage-driver vfs copy "$c" /bin/busybox /bin/busybox >/dev/null
      buildah --storage-driver vfs run --isolation chroot "$c" -- /bin/busybox --install -s /bin >/dev/null 2>&1 ||
        for a in sh ls cat printenv sleep env kill wget httpd grep sed tr wc head tail nc test echo touch date id ps mkdir rm trap true false; do
          buildah --storage-driver vfs run --isolation chroot "$c" -- /bin/busybox ln -s /bin/busybox /bin/$a >/dev/null 2>&1 || true
        done
      buildah --storage-driver vfs config --entrypoint '[]' --cmd '["/bin/sh"]' --env PATH=/bin "$c"
    fi
    buildah --storage-driver vfs commit -q "$c" "sidekey.local/$img:1" >/dev/null
    buildah --storage-driver vfs rm "$c" >/dev/null
    rm -f "$tar"
    buildah --storage-driver vfs push -q "sidekey.local/$img:1" "docker-archive:$tar:sidekey.local/$img:1" >/dev/null
    "${NS[@]}" "$bin/ctr" -a "$run/containerd.sock" -n k8s.io images import --snapshotter overlayfs "$tar" >/dev/null
  done
}

api_ready() { "$bin/kubectl" --kubeconfig "$kubeconfig" get --raw /readyz >/dev/null; }
node_ready() {
  [ "$("$bin/kubectl" --kubeconfig "$kubeconfig" get node $node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

up() {
  need_root
  install_packages
  log "building or reusing the cluster binaries (the first build on a machine takes about 25 minutes on 2 cores)"
  bin=$("$root/scripts/cluster-build.sh" | tail -n 1)
  mkdir -p "$state" "$run" "$logs"
  echo "$bin" >"$state/bin"
  if pid_alive kubelet && api_ready 2>/dev/null && node_ready; then
    # A node started with an older containerd config gets the new one with one containerd
    # restart (running containers keep running under their shims).
    containerd_config "$state/containerd/config.toml.new"
    if ! cmp -s "$state/containerd/config.toml.new" "$state/containerd/config.toml"; then
      log "the containerd config changed: restarting containerd"
      mv "$state/containerd/config.toml.new" "$state/containerd/config.toml"
      kill "$(cat "$run/containerd.pid")" 2>/dev/null || true
      local deadline=$((SECONDS + 30))
      while pid_alive containerd && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
      start containerd env PATH="$bin:$PATH" "$bin/containerd" --config "$state/containerd/config.toml"
      wait_for "containerd" 60 containerd "${NS[@]}" "$bin/ctr" -a "$run/containerd.sock" version
    fi
    rm -f "$state/containerd/config.toml.new"
    log "already running"
    echo "$kubeconfig"
    return 0
  fi
  network_up
  pki_up

  start etcd "$bin/etcd" --name $node --data-dir "$state/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster $node=http://127.0.0.1:2380 --unsafe-no-fsync --watch-progress-notify-interval=5s \
    --log-level=warn
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port=6443 \
    --advertise-address=$node_ip --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=$service_cidr --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-admission-plugins=NodeRestriction --enable-aggregator-routing=true \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --cert-dir="$state/apiserver-certs" --profiling=false --v=1
  wait_for "the API server (/readyz)" 120 kube-apiserver api_ready

  start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig="$state/kcm.kubeconfig" \
    --authentication-kubeconfig="$state/kcm.kubeconfig" --authorization-kubeconfig="$state/kcm.kubeconfig" \
    --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --use-service-account-credentials=true --allocate-node-cidrs=false \
    --service-cluster-ip-range=$service_cidr --controllers='*' --leader-elect=false \
    --bind-address=127.0.0.1 --v=1
  cat >"$state/scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection: {kubeconfig: $state/scheduler.kubeconfig}
leaderElection: {leaderElect: false}
EOF
  start kube-scheduler "$bin/kube-scheduler" --config="$state/scheduler.yaml" --bind-address=127.0.0.1 --v=1

  containerd_config "$state/containerd/config.toml"
  start containerd env PATH="$bin:$PATH" "$bin/containerd" --config "$state/containerd/config.toml"
  wait_for "containerd" 60 containerd "${NS[@]}" "$bin/ctr" -a "$run/containerd.sock" version
  node_images

  kubelet_config
  mkdir -p "$state/kubelet"
  start kubelet "$bin/kubelet" --config="$state/kubelet.yaml" --kubeconfig="$state/kubelet.kubeconfig" \
    --hostname-override=$node --node-ip=$node_ip --root-dir="$state/kubelet" --cert-dir="$state/kubelet/pki" --v=1
  wait_for "node $node to be Ready" 180 kubelet node_ready
  wait_for "the default ServiceAccount" 60 kube-controller-manager \
    "$bin/kubectl" --kubeconfig "$kubeconfig" -n default get serviceaccount default
  log "up: $("$bin/kubectl" --kubeconfig "$kubeconfig" version 2>/dev/null | tail -n 1); logs in $logs"
  echo "$kubeconfig"
}

down() {
  need_root
  local name
  for name in kubelet kube-scheduler kube-controller-manager kube-apiserver; do
    if [ -f "$run/$name.pid" ]; then kill "$(cat "$run/$name.pid")" 2>/dev/null || true; fi
  done
  # Every container of the node, then containerd and its shims.
  if [ -S "$run/containerd.sock" ] && [ -f "$state/bin" ]; then
    local ctr
    ctr="$(cat "$state/bin")/ctr"
    local t
    for t in $("${NS[@]}" "$ctr" -a "$run/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
      "${NS[@]}" "$ctr" -a "$run/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
    done
  fi
  for name in containerd etcd; do
    if [ -f "$run/$name.pid" ]; then kill "$(cat "$run/$name.pid")" 2>/dev/null || true; fi
  done
  pkill -9 -f "containerd-shim-runc-v2 .*-address $run/containerd.sock" 2>/dev/null || true
  sleep 1
  for name in kubelet kube-scheduler kube-controller-manager kube-apiserver containerd etcd; do
    if [ -f "$run/$name.pid" ]; then kill -9 "$(cat "$run/$name.pid")" 2>/dev/null || true; fi
  done
  # Mounts under the node's folders (pod volumes, overlay snapshots, sandbox namespaces), deepest first.
  local m
  for m in $(awk -v s="$state" -v r="$run" '$2 ~ "^"s || $2 ~ "^"r {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # The pods' cgroups, deepest first (the kubelet's cgroupfs driver puts them under /kubepods).
  local d
  for d in /sys/fs/cgroup/*/kubepods; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  ip link del sk-host 2>/dev/null || true
  ip route del $pod_cidr 2>/dev/null || true
  [ -e /run/netns/$netns ] && ip netns del $netns 2>/dev/null || true
  rm -rf "$state" "$run"
  log "down: the node's processes, network namespace, mounts and state are gone"
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
    if pid_alive $name; then echo "$name: running (pid $(cat "$run/$name.pid"), log $logs/$name.log)"; else echo "$name: stopped"; fi
  done
}

env_lines() {
  [ -f "$state/bin" ] || fail "the cluster is not up: run ./scripts/cluster.sh up"
  echo "export KUBECONFIG=$kubeconfig"
  echo "export SIDEKEY_CLUSTER_BIN=$(cat "$state/bin")"
  echo "export SIDEKEY_NODE_IP=$node_ip SIDEKEY_HOST_IP=$host_ip"
  echo "export PATH=$(cat "$state/bin"):\$PATH"
}

# One `up` or `down` at a time: test binaries and the demo may ask at once.
lock() {
  mkdir -p "$(dirname "$state")"
  exec 9>"$(dirname "$state")/.sidekey-cluster.lock"
  flock 9
}

case "${1:-}" in
  up) need_root; lock; up ;;
  down) need_root; lock; down ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
