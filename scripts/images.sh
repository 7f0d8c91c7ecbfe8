#!/usr/bin/env bash
# Builds the two container images users install, from this checkout, without a registry or a
# daemon: each binary is built on its own (never a workspace build, whose unified features differ
# from what ships) as a static executable, then put in a FROM-scratch image with buildah.
#
#   ./scripts/images.sh            # -> target/images/sidekey-agent.tar, target/images/sidekey-injector.tar,
#                                  #    target/images/kubectl-sidekey-<version>-x86_64-linux.tar.gz
#
# The archives are OCI image archives tagged as the chart's defaults
# (ghcr.io/sidekey/<name>:<appVersion>), loadable with `podman load -i`, `docker load -i`,
# `kind load image-archive` and `ctr images import`. Two builds of the same commit give the same
# manifest digests (fixed timestamps, identical layers); the digests are printed at the end and
# written to target/images/digests.txt.
#
# How the binaries are static: only the x86_64-unknown-linux-gnu target exists on these machines,
# so they link glibc statically (-C target-feature=+crt-static). --target is passed so that the
# flag applies to the binaries only, not to build scripts and proc macros. Names resolve through
# getaddrinfo with no NSS module in the image: glibc (2.34 on) has its "files" and "dns" lookups
# inside libc itself, so the static binary reads /etc/hosts and /etc/resolv.conf as the pod's
# runtime writes them (tests/tests/cluster/simulation.rs reaches the store by a hostAliases name and through a DNS server).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf 'images: %s\n' "$*" >&2; }

if ! command -v buildah >/dev/null 2>&1; then
  say "buildah is not installed; install it with: apt-get install -y buildah   (Debian/Ubuntu; or run ./scripts/stack-install.sh as root)"
  exit 1
fi

triple=x86_64-unknown-linux-gnu
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/sidekey/Chart.yaml)
crate_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
if [ "$version" != "$crate_version" ]; then
  say "charts/sidekey/Chart.yaml appVersion ($version) differs from the workspace version ($crate_version)"
  exit 1
fi
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=https://github.com/sidekey/sidekey
registry=ghcr.io/sidekey
out="$root/target/images"
storage=(--storage-driver vfs)
mkdir -p "$out"

# Reproducible binaries: no absolute paths of this checkout or of the cargo home in them.
# The static executables are position-independent (ASLR), so glibc's start code relocates every
# pointer in their read-only data before main. In the classic format (.rela.dyn, 24 bytes a
# pointer) that table is about 320 KiB of the agent, read whole at every start, so it is in every
# agent's RSS; packed relative relocations (-z pack-relative-relocs, DT_RELR: GNU ld >= 2.38,
# glibc >= 2.36) carry the same relocations in 4 KiB.
export RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs --remap-path-prefix=$root=/sidekey --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
export SOURCE_DATE_EPOCH=0

ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca_bundle" ] || { say "no CA bundle at $ca_bundle; install it with: apt-get install -y ca-certificates"; exit 1; }

for name in sidekey-agent sidekey-injector; do
  # The agent has a profile of its own (agent-release: opt-level "z", see Cargo.toml).
  case $name in
    sidekey-agent) profile=agent-release ;;
    *) profile=release ;;
  esac
  say "building $name alone ($profile, static)"
  cargo build --profile "$profile" --locked -p "$name" --target "$triple" --bin "$name"
  bin="target/$triple/$profile/$name"
  if ! file_out=$(LC_ALL=C readelf -l "$bin" 2>/dev/null) || grep -q 'Requesting program interpreter' <<<"$file_out"; then
    say "$bin is not a static executable"
    exit 1
  fi
  ctx="$out/context-$name"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp "$bin" "$ctx/$name"
  cp "$ca_bundle" "$ctx/ca-certificates.crt"
  chmod 0755 "$ctx/$name"
  chmod 0644 "$ctx/ca-certificates.crt"
  touch -d @0 "$ctx/$name" "$ctx/ca-certificates.crt"
  short=${name#sidekey-}
  tag="$registry/$name:$version"
  say "building image $tag"
  buildah "${storage[@]}" bud --quiet --layers=false --timestamp 0 --identity-label=false \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source_url" \
    -t "$tag" -f "images/$short.Containerfile" "$ctx" >/dev/null
  rm -f "$out/$name.tar"
  buildah "${storage[@]}" push --quiet "$tag" "oci-archive:$out/$name.tar:$tag"
done

: >"$out/digests.txt"
for name in sidekey-agent sidekey-injector; do
  digest=$(tar -xOf "$out/$name.tar" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')
  size=$(stat -c %s "$out/$name.tar")
  printf '%s %s %s\n' "$registry/$name:$version" "$digest" "$size" | tee -a "$out/digests.txt"
done

# The kubectl plugin ships as an archive of its own beside the images, not in one: it runs on the
# operator's machine, where kubectl finds `kubectl-sidekey` on the PATH
# (target/images/kubectl-sidekey-<version>-x86_64-linux.tar.gz holds the static binary alone).
plugin=kubectl-sidekey
say "building $plugin alone (release, static)"
cargo build --profile release --locked -p "$plugin" --target "$triple" --bin "$plugin"
plugin_bin="target/$triple/release/$plugin"
if LC_ALL=C readelf -l "$plugin_bin" | grep -q 'Requesting program interpreter'; then
  say "$plugin_bin is not a static executable"
  exit 1
fi
plugin_dir="$out/context-$plugin"
rm -rf "$plugin_dir"
mkdir -p "$plugin_dir"
cp "$plugin_bin" "$plugin_dir/$plugin"
chmod 0755 "$plugin_dir/$plugin"
touch -d @0 "$plugin_dir/$plugin"
plugin_archive="$out/$plugin-$version-x86_64-linux.tar.gz"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$plugin_dir" -cf - "$plugin" | gzip -9n >"$plugin_archive"
printf '%s %s %s\n' "$(basename "$plugin_archive")" "sha256:$(sha256sum "$plugin_archive" | cut -d' ' -f1)" "$(stat -c %s "$plugin_archive")" | tee -a "$out/digests.txt"

# The SBOMs, beside the archives (target/images/<name>.spdx.json, SPDX 2.3): the dependency set
# each binary was built from above (its package, target and default features, with Cargo.lock's
# checksums), the binary's and the CA bundle's SHA-256, glibc and the toolchain (scripts/sbom.py).
# scripts/publish.sh attaches them to the pushed images; they are not in the images, whose digests
# they leave alone.
sbom() {
  local name=$1 profile=$2
  python3 "$root/scripts/sbom.py" generate --name "$name" --version "$version" \
    --package "$name" --bin "target/$triple/$profile/$name" \
    --target "$triple" --ca-bundle "$ca_bundle" --out "$out/$name.spdx.json"
}
sbom sidekey-agent agent-release
sbom sidekey-injector release
