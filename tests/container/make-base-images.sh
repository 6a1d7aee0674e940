#!/usr/bin/env bash
# Makes the debian:bookworm and debian:bookworm-slim base images the Dockerfile starts FROM, for
# machines that reach an apt mirror but no container registry: `debootstrap --variant=minbase`
# from the mirror this machine's apt uses, then `podman import`. Images already present are kept
# (pass --force to remake them). Serialised with a lock, so concurrent runs make them once.
#
# The images are like Debian's official ones (same suites, minbase, apt lists dropped; -slim also
# without documentation, manual pages and translations, and dpkg told not to install them), minus
# their Docker-specific apt settings (docker-clean): whatever the Dockerfile needs, it does itself.
#
# Usage: tests/container/make-base-images.sh [--force]    (root; podman and debootstrap)
# Environment: APT_MIRROR overrides the mirror (default: the first Debian URI in apt's sources);
# CONTAINERS_CONF is honoured by podman as usual.
set -euo pipefail

force=0
[[ "${1:-}" == "--force" ]] && force=1
SUITE=bookworm
FULL=localhost/debian:$SUITE
SLIM=localhost/debian:$SUITE-slim

have() { podman image exists "$1"; }

exec 9>/var/tmp/agenthost-base-images.lock
flock 9
if [[ $force -eq 0 ]] && have "$FULL" && have "$SLIM"; then
    exit 0
fi

# Debian mirror and security mirror from apt's own configuration (deb822 or one-line format).
sources() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null || true
}
uris=$(sources | sed -nE 's/^URIs:[[:space:]]*//p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
    | tr ' ' '\n' | grep -E '^https?://' || true)
mirror=${APT_MIRROR:-$(grep -vE 'security' <<<"$uris" | grep -E '/debian/?$' | head -n1 || true)}
security=$(grep -E 'debian-security/?$' <<<"$uris" | head -n1 || true)
if [[ -z "$mirror" ]]; then
    echo "make-base-images: no Debian mirror in /etc/apt/sources.list*; set APT_MIRROR" >&2
    exit 1
fi
security=${security:-${mirror%/debian}/debian-security}

work=$(mktemp -d /var/tmp/agenthost-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
echo "make-base-images: debootstrap --variant=minbase $SUITE from $mirror" >&2
if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    echo "make-base-images: debootstrap failed" >&2
    exit 1
fi
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
: >"$rootfs/etc/hostname"
: >"$rootfs/etc/resolv.conf"

import() { # $1 = image name
    tar --numeric-owner -C "$rootfs" -c . \
        | podman import -q --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$1" >/dev/null
    echo "make-base-images: $1 ($(podman image inspect --format '{{.Size}}' "$1") bytes)" >&2
}
import "$FULL"

# -slim: what Debian's slim images leave out, and the dpkg settings that keep it out.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/groff/*
DPKG
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/groff/*
import "$SLIM"
