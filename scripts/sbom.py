#!/usr/bin/env python3
"""The images' SBOMs (SPDX 2.3 JSON), and their place in a registry as OCI artifacts.

  sbom.py generate --name sidekey-agent --package sidekey-agent --bin target/.../sidekey-agent \
      --target x86_64-unknown-linux-gnu --ca-bundle /etc/ssl/certs/ca-certificates.crt --out FILE
      The dependency set is the one cargo builds that binary from: `cargo tree -p PACKAGE --target
      TARGET -e normal` (the same package, target and default features as scripts/images.sh, so the
      features a workspace build would unify in are not there), with the checksums of Cargo.lock.
      Crates reached only through a proc-macro run at build time: they are listed as build
      dependencies, not as contents. The file also names the binary's and the CA bundle's SHA-256,
      the Debian ca-certificates package the bundle comes from, glibc (linked in statically) and the
      Rust toolchain. Deterministic: two runs on the same inputs write the same bytes.

  sbom.py attach --sbom FILE --image HOST:PORT/REPO:TAG [--ca-file CA]
      Pushes the SBOM as an OCI artifact whose `subject` is the image's manifest (artifactType
      application/spdx+json), through the registry's HTTP API, and lists it where OCI 1.1 clients
      look: the registry's referrers API when it has one, else the referrers tag `sha256-<hex>`
      (an image index of the artifacts that refer to that digest). The image's own manifest is
      never touched. Prints the artifact's digest.

  sbom.py fetch --image HOST:PORT/REPO:TAG [--ca-file CA] --out FILE
      Finds the image's SPDX referrer the same way and writes the SBOM; fails when there is none.
"""

import argparse
import hashlib
import json
import os
import ssl
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

SPDX_TYPE = "application/spdx+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
ROOT = Path(__file__).resolve().parent.parent


class Failure(Exception):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spdx_id(text: str) -> str:
    return "SPDXRef-" + "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


# --- generate -------------------------------------------------------------------------------


def cargo_tree(package: str, target: str) -> list[tuple[int, str, str, bool, str]]:
    """(depth, name, version, proc_macro, features) per line of `cargo tree`, in its order."""
    out = subprocess.run(
        ["cargo", "tree", "--locked", "-p", package, "--target", target, "-e", "normal",
         "--prefix", "depth", "-f", "{p}|{f}"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        digits = len(line) - len(line.lstrip("0123456789"))
        depth = int(line[:digits])
        spec, _, features = line[digits:].partition("|")
        # A package already shown ends in " (*)": cargo tree prints its dependencies once.
        features = features.removesuffix(" (*)")
        words = spec.split()
        name, version = words[0], words[1].lstrip("v")
        rows.append((depth, name, version, "(proc-macro)" in spec, features.strip()))
    return rows


def lock_packages() -> dict[tuple[str, str], dict]:
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    return {(p["name"], p["version"]): p for p in lock["package"]}


def licenses(target: str) -> dict[tuple[str, str], str]:
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--locked", "--format-version", "1", "--filter-platform", target],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout)
    # Old crates write "MIT/Apache-2.0", which SPDX spells "MIT OR Apache-2.0".
    return {(p["name"], p["version"]): (p.get("license") or "NOASSERTION").replace("/", " OR ")
            for p in meta["packages"]}


def dpkg_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "NOASSERTION"


def generate(args) -> None:
    binaries = [Path(b) for b in args.bin]
    if len(binaries) != len(args.package):
        raise Failure("give one --bin per --package")
    for b in binaries:
        if not b.is_file():
            raise Failure(f"{b}: no such binary (build it first: scripts/images.sh)")
    ca = Path(args.ca_bundle)
    if not ca.is_file():
        raise Failure(f"{ca}: no such CA bundle")
    version = args.version
    lock = lock_packages()
    license_of = licenses(args.target)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    import datetime
    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rustc = subprocess.run(["rustc", "--version"], check=True, capture_output=True, text=True).stdout.strip()

    packages: dict[str, dict] = {}
    relationships: set[tuple[str, str, str]] = set()
    files = []
    image_id = spdx_id(f"image-{args.name}")
    packages[image_id] = {
        "SPDXID": image_id, "name": args.name, "versionInfo": version,
        "primaryPackagePurpose": "CONTAINER",
        "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "comment": "A FROM scratch image: the files below and nothing else.",
    }
    for package, binary in zip(args.package, binaries):
        data = binary.read_bytes()
        file_id = spdx_id(f"file-{binary.name}")
        files.append({
            "SPDXID": file_id, "fileName": f"/usr/local/bin/{binary.name}",
            "checksums": [{"algorithm": "SHA256", "checksumValue": sha256(data)}],
            "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION",
            "comment": f"Built from crate {package} for {args.target}, statically linked.",
        })
        relationships.add((image_id, "CONTAINS", file_id))
        stack: list[tuple[int, str, bool]] = []  # (depth, spdx id, reached through a proc-macro)
        for depth, name, ver, proc_macro, features in cargo_tree(package, args.target):
            while stack and stack[-1][0] >= depth:
                stack.pop()
            pid = spdx_id(f"cargo-{name}-{ver}")
            host = proc_macro or (stack[-1][2] if stack else False)
            if pid not in packages:
                entry = lock.get((name, ver), {})
                source = entry.get("source", "")
                pkg = {
                    "SPDXID": pid, "name": name, "versionInfo": ver,
                    "downloadLocation": (f"https://crates.io/api/v1/crates/{name}/{ver}/download"
                                         if source.startswith("registry+") else "NOASSERTION"),
                    "filesAnalyzed": False,
                    "licenseConcluded": "NOASSERTION",
                    "licenseDeclared": license_of.get((name, ver), "NOASSERTION"),
                    "copyrightText": "NOASSERTION",
                    "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                      "referenceLocator": f"pkg:cargo/{name}@{ver}"}],
                }
                if entry.get("checksum"):
                    pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": entry["checksum"]}]
                if not source:
                    pkg["comment"] = "a crate of this workspace"
                packages[pid] = pkg
            pkg = packages[pid]
            if features:
                pkg.setdefault("_features", set()).update(features.split(","))
            if not host:
                pkg["_in_binary"] = True
            if stack:
                parent = stack[-1][1]
                if host:
                    relationships.add((pid, "BUILD_DEPENDENCY_OF", parent))
                else:
                    relationships.add((parent, "DEPENDS_ON", pid))
            else:
                relationships.add((file_id, "GENERATED_FROM", pid))
            stack.append((depth, pid, host))

    ca_data = ca.read_bytes()
    ca_file = spdx_id("file-ca-certificates.crt")
    files.append({
        "SPDXID": ca_file, "fileName": "/etc/ssl/certs/ca-certificates.crt",
        "checksums": [{"algorithm": "SHA256", "checksumValue": sha256(ca_data)}],
        "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION",
        "comment": f"{ca_data.count(b'BEGIN CERTIFICATE')} CA certificates, from {ca}.",
    })
    relationships.add((image_id, "CONTAINS", ca_file))
    for deb, purpose, comment, related in [
        ("ca-certificates", ca_file, "The CA bundle's source.", "GENERATED_FROM"),
        ("libc6-dev", None, "glibc, linked statically into the binaries.", "STATIC_LINK"),
    ]:
        ver = dpkg_version(deb)
        pid = spdx_id(f"deb-{deb}")
        packages[pid] = {
            "SPDXID": pid, "name": deb, "versionInfo": ver, "supplier": "Organization: Debian",
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION", "comment": comment,
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{deb}@{ver}"}],
        }
        if purpose:
            relationships.add((purpose, related, pid))
        else:
            for f in files[:-1]:
                relationships.add((pid, related, f["SPDXID"]))
    toolchain = spdx_id("rust-toolchain")
    packages[toolchain] = {
        "SPDXID": toolchain, "name": "rustc", "versionInfo": rustc.split()[1],
        "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION", "licenseDeclared": "MIT OR Apache-2.0",
        "copyrightText": "NOASSERTION",
        "comment": f"{rustc}; its standard library is linked into the binaries.",
    }
    for f in files[:-1]:
        relationships.add((toolchain, "BUILD_TOOL_OF", f["SPDXID"]))

    out_packages = []
    for pid in sorted(packages):
        pkg = dict(packages[pid])
        features = sorted(pkg.pop("_features", set()) - {""})
        in_binary = pkg.pop("_in_binary", False)
        if pid.startswith("SPDXRef-cargo-"):
            note = "in the binary" if in_binary else "build time only (proc-macro)"
            feats = f"; features: {', '.join(features)}" if features else "; no features"
            pkg["comment"] = (pkg["comment"] + "; " if pkg.get("comment") else "") + note + feats
        out_packages.append(pkg)
    digest_seed = sha256(json.dumps([out_packages, files], sort_keys=True).encode())
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{args.name}-{version}",
        "documentNamespace": f"https://github.com/sidekey/sidekey/spdx/{args.name}-{version}-{digest_seed}",
        "creationInfo": {"created": created, "creators": ["Tool: sidekey scripts/sbom.py", f"Tool: {rustc}"]},
        "documentDescribes": [image_id],
        "packages": out_packages,
        "files": files,
        "relationships": [
            {"spdxElementId": a, "relationshipType": r, "relatedSpdxElement": b}
            for a, r, b in sorted(relationships)
        ] + [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
              "relatedSpdxElement": image_id}],
    }
    Path(args.out).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    in_binary = sum(1 for p in out_packages if "in the binary" in p.get("comment", ""))
    print(f"sbom: {args.out}: {in_binary} crates in the binary, "
          f"{len(out_packages) - in_binary} other packages", file=sys.stderr)


# --- registry -------------------------------------------------------------------------------


class Registry:
    def __init__(self, image: str, ca_file: str | None):
        host, _, rest = image.partition("/")
        if not rest:
            raise Failure(f"{image}: expected HOST:PORT/REPOSITORY:TAG")
        if "@" in rest:
            repo, _, ref = rest.partition("@")
        else:
            repo, _, ref = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "latest")
        self.base = f"https://{host}/v2/{repo}"
        self.image, self.repo, self.ref = image, repo, ref
        self.ctx = ssl.create_default_context(cafile=ca_file)

    def request(self, method, path, body=None, headers=None, ok=(200, 201, 202)):
        url = path if path.startswith("https://") else self.base + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=self.ctx) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return e.code, dict(e.headers), e.read()
            raise Failure(f"{method} {url}: HTTP {e.code}: {e.read()[:300]!r}") from None

    def status(self, method, path, headers=None) -> int:
        try:
            return self.request(method, path, headers=headers)[0]
        except Failure:
            return 404

    def manifest(self, ref, accept) -> tuple[bytes, str]:
        _, headers, body = self.request("GET", f"/manifests/{ref}", headers={"Accept": accept})
        return body, headers.get("Content-Type", "")

    def push_blob(self, data: bytes) -> str:
        digest = "sha256:" + sha256(data)
        if self.status("HEAD", f"/blobs/{digest}") == 200:
            return digest
        _, headers, _ = self.request("POST", "/blobs/uploads/")
        location = headers["Location"]
        if location.startswith("/"):
            location = self.base.split("/v2/")[0] + location
        sep = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{sep}digest={digest}", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        return digest

    def put_manifest(self, ref, data: bytes, media_type: str) -> None:
        self.request("PUT", f"/manifests/{ref}", body=data, headers={"Content-Type": media_type})

    def subject(self) -> dict:
        body, media_type = self.manifest(self.ref, f"{OCI_MANIFEST}, {OCI_INDEX}")
        return {"mediaType": media_type.split(";")[0], "digest": "sha256:" + sha256(body), "size": len(body)}

    def referrers(self, digest: str) -> tuple[list[dict], bool]:
        """The referrers of digest, and whether the registry has the referrers API."""
        status, _, body = self.request("GET", f"/referrers/{digest}", headers={"Accept": OCI_INDEX},
                                       ok=(200, 404))
        if status == 200:
            return json.loads(body).get("manifests", []), True
        tag = digest.replace(":", "-")
        try:
            body, _ = self.manifest(tag, OCI_INDEX)
        except Failure:
            return [], False
        return json.loads(body).get("manifests", []), False


def attach(args) -> None:
    reg = Registry(args.image, args.ca_file)
    data = Path(args.sbom).read_bytes()
    json.loads(data)
    subject = reg.subject()
    sbom_digest = reg.push_blob(data)
    empty_digest = reg.push_blob(EMPTY)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SPDX_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty_digest, "size": len(EMPTY), "data": "e30="},
        "layers": [{"mediaType": SPDX_TYPE, "digest": sbom_digest, "size": len(data),
                    "annotations": {"org.opencontainers.image.title": Path(args.sbom).name}}],
        "subject": subject,
        "annotations": {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"},
    }
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + sha256(body)
    reg.put_manifest(digest, body, OCI_MANIFEST)
    listed, api = reg.referrers(subject["digest"])
    if not api:
        # The referrers tag schema (OCI distribution 1.1) for registries without the API.
        descriptor = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                      "artifactType": SPDX_TYPE, "annotations": manifest["annotations"]}
        kept = [m for m in listed if m.get("digest") != digest]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept + [descriptor]}
        reg.put_manifest(subject["digest"].replace(":", "-"),
                         json.dumps(index, separators=(",", ":"), sort_keys=True).encode(), OCI_INDEX)
    after = reg.subject()
    if after["digest"] != subject["digest"]:
        raise Failure(f"{args.image} changed from {subject['digest']} to {after['digest']}")
    print(digest)


def fetch(args) -> None:
    reg = Registry(args.image, args.ca_file)
    subject = reg.subject()
    listed, _ = reg.referrers(subject["digest"])
    sboms = [m for m in listed if m.get("artifactType") == SPDX_TYPE]
    if not sboms:
        raise Failure(f"{args.image} ({subject['digest']}) has no {SPDX_TYPE} referrer")
    body, _ = reg.manifest(sboms[-1]["digest"], OCI_MANIFEST)
    if "sha256:" + sha256(body) != sboms[-1]["digest"]:
        raise Failure(f"the referrer {sboms[-1]['digest']} does not match its digest")
    manifest = json.loads(body)
    if manifest.get("subject", {}).get("digest") != subject["digest"]:
        raise Failure(f"the referrer {sboms[-1]['digest']} names another subject")
    layer = manifest["layers"][0]
    _, _, data = reg.request("GET", f"/blobs/{layer['digest']}")
    if "sha256:" + sha256(data) != layer["digest"]:
        raise Failure(f"the SBOM blob does not match its digest {layer['digest']}")
    Path(args.out).write_bytes(data)
    print(f"{sboms[-1]['digest']} -> {args.out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--name", required=True, help="the image's name (sidekey-agent)")
    g.add_argument("--version", required=True)
    g.add_argument("--package", action="append", required=True, help="a cargo package in the image")
    g.add_argument("--bin", action="append", required=True, help="its binary as built")
    g.add_argument("--target", required=True)
    g.add_argument("--ca-bundle", required=True)
    g.add_argument("--out", required=True)
    for name in ("attach", "fetch"):
        p = sub.add_parser(name)
        p.add_argument("--image", required=True)
        p.add_argument("--ca-file")
        if name == "attach":
            p.add_argument("--sbom", required=True)
        else:
            p.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        {"generate": generate, "attach": attach, "fetch": fetch}[args.command](args)
    except (Failure, subprocess.CalledProcessError, OSError, KeyError, ValueError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f"sbom.py {args.command}: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
