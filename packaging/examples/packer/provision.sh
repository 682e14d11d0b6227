#!/bin/sh
# Image-build provisioner for driftwatch: run as root inside the image being built (Packer's
# shell provisioner, see driftwatch-image.pkr.hcl), as the LAST step that changes the image.
#
#   1. installs the agent package (a package file, or driftwatch-agent from the configured
#      repository);
#   2. writes the site configuration drop-in /etc/driftwatch/agent.d/50-image.toml (the
#      collector) and the pipeline's PUBLIC key /etc/driftwatch/pipeline.pub;
#   3. creates the signed baseline of this root, /etc/driftwatch/baseline.dwb, and verifies it;
#   4. deletes the private signing key, which the build uploaded to $DRIFTWATCH_BUILD_DIR (a
#      tmpfs: /run), so it never becomes part of the image.
#
# Pushing the baseline to the collector is not done here: the build downloads the baseline and
# push-baseline.sh registers it from the build host, so the API token never enters the image.
#
# Environment:
#   DRIFTWATCH_IMAGE_ID        required, e.g. web
#   DRIFTWATCH_IMAGE_VERSION   required, e.g. 2026.11.26-1 (unique per build of that image)
#   DRIFTWATCH_COLLECTOR       required: the collector's gRPC URL for the agents,
#                              e.g. https://collector.example.com:7443
#   DRIFTWATCH_BUILD_DIR       where the build uploaded its files [/run/driftwatch-build]:
#                              pipeline.key (private, deleted here), pipeline.pub, and optionally
#                              policy.toml (merged over the built-in policy) and the package
#   DRIFTWATCH_AGENT_PACKAGE   the agent package file (.deb or .rpm); unset: install
#                              driftwatch-agent with apt-get or dnf from the configured repository
#   DRIFTWATCH_BASELINE_EXPIRES  optional: --expires of the baseline (e.g. 180d)
set -eu

die() {
    echo "provision.sh: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (Packer: execute_command with sudo)"
image_id=${DRIFTWATCH_IMAGE_ID:?DRIFTWATCH_IMAGE_ID is not set}
image_version=${DRIFTWATCH_IMAGE_VERSION:?DRIFTWATCH_IMAGE_VERSION is not set}
collector=${DRIFTWATCH_COLLECTOR:?DRIFTWATCH_COLLECTOR is not set (the collector gRPC URL)}
build_dir=${DRIFTWATCH_BUILD_DIR:-/run/driftwatch-build}
key=$build_dir/pipeline.key
pub=$build_dir/pipeline.pub

case $collector in
    https://*) ;;
    *) die "DRIFTWATCH_COLLECTOR must be an https:// URL, not '$collector'" ;;
esac
case $collector in
    *'"'* | *\\*) die "DRIFTWATCH_COLLECTOR contains a quote or backslash" ;;
esac

# Whatever happens below, the private key does not outlive this script.
trap 'rm -f "$key"' EXIT
[ -f "$key" ] || die "no signing key at $key (upload it from the build environment)"
[ -f "$pub" ] || die "no public key at $pub"

echo "== install the agent"
pkg=${DRIFTWATCH_AGENT_PACKAGE:-}
if [ -n "$pkg" ]; then
    [ -f "$pkg" ] || die "DRIFTWATCH_AGENT_PACKAGE: no file $pkg"
    case $pkg in
        /*) ;;
        *) pkg=$(pwd)/$pkg ;;
    esac
fi
if command -v apt-get >/dev/null; then
    case $pkg in
        "") set -- driftwatch-agent ;;
        *.deb) set -- "$pkg" ;;
        *) die "$pkg: apt-get installs .deb packages" ;;
    esac
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
elif command -v dnf >/dev/null; then
    case $pkg in
        "") set -- driftwatch-agent ;;
        *.rpm) set -- "$pkg" ;;
        *) die "$pkg: dnf installs .rpm packages" ;;
    esac
    dnf install -y -q "$@"
else
    die "neither apt-get nor dnf found"
fi
command -v driftwatch-agent >/dev/null || die "driftwatch-agent is not installed"

echo "== configure"
install -d -m 0755 /etc/driftwatch/agent.d
install -m 0644 "$pub" /etc/driftwatch/pipeline.pub
cat >/etc/driftwatch/agent.d/50-image.toml <<EOF
# Written by the image pipeline (provision.sh) for image $image_id $image_version.
collector = "$collector"
EOF
chmod 0644 /etc/driftwatch/agent.d/50-image.toml

echo "== baseline"
work=$(mktemp -d)
trap 'rm -f "$key"; rm -rf "$work"' EXIT
# The baseline cannot contain its own digest: the file it is written to is expected to appear
# (mutable: it may come and go; its signature and the collector's image registry vouch for it).
{
    if [ -f "$build_dir/policy.toml" ]; then
        cat "$build_dir/policy.toml"
        echo
    fi
    cat <<'EOF'
[[rule]]
paths = ["/etc/driftwatch/baseline.dwb"]
mutable = true
EOF
} >"$work/policy.toml"
set -- --root / --image-id "$image_id" --image-version "$image_version" \
    --policy "$work/policy.toml" --sign-key "$key" --out /etc/driftwatch/baseline.dwb
if [ -n "${DRIFTWATCH_BASELINE_EXPIRES:-}" ]; then
    set -- "$@" --expires "$DRIFTWATCH_BASELINE_EXPIRES"
fi
driftwatch-agent baseline create "$@"
rm -f "$key"
chmod 0644 /etc/driftwatch/baseline.dwb
driftwatch-agent baseline verify /etc/driftwatch/baseline.dwb \
    --trusted-key /etc/driftwatch/pipeline.pub
driftwatch-agent baseline show /etc/driftwatch/baseline.dwb
echo "== image $image_id $image_version: baseline /etc/driftwatch/baseline.dwb (download it and run push-baseline.sh)"
