#!/usr/bin/env bash
# A stand-in for the official Python image (python:3.11-slim-bookworm), made from Debian's
# own packages where Docker Hub is out of reach: debootstrap (minbase) of bookworm from the
# mirror apt uses here, with python3.11, pip and CA certificates, imported with `docker import`.
#
#   tools/image/base-image.sh          # prints the tag, building the image only if it is missing
#   tools/image/base-image.sh --tag    # prints the tag only
#
# The tag is eskit-base:bookworm-<hash of this file>: the image is built once per machine and
# reused until this recipe changes. Then `docker build --build-arg BASE_IMAGE=<tag> .`.
# Needs root, debootstrap and a running Docker engine. Set DEBIAN_MIRROR to use another mirror.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# The machine's own extra CA certificates (a TLS-inspecting proxy's, say) are trusted in the
# image too, as on the machine: pip and uv reach PyPI through it. They are part of the recipe.
local_cas=(/usr/local/share/ca-certificates/*.crt)
[[ -e "${local_cas[0]}" ]] || local_cas=()
recipe_hash="$(cat "$here/base-image.sh" "${local_cas[@]}" | sha256sum | cut -c1-12)"
tag="eskit-base:bookworm-${recipe_hash}"

if [[ "${1:-}" == "--tag" ]]; then  # only the tag, built or not
  echo "$tag"
  exit 0
fi
built() { docker image inspect "$tag" >/dev/null 2>&1; }
if built; then
  echo "$tag"
  exit 0
fi
# One build at a time on this machine; a second caller waits, then reuses the image.
exec 9>/var/tmp/eskit-base-image.lock
flock 9
if built; then
  echo "$tag"
  exit 0
fi

# The mirror apt already uses (deb822 or one-line sources), else Debian's own.
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security \
    | head -n1 | awk '{print $2}')" || true
fi
if [[ -z "$mirror" ]]; then
  mirror="$(grep -hsE '^deb ' /etc/apt/sources.list | grep -v security \
    | head -n1 | awk '{print $2}')" || true
fi
mirror="${mirror:-http://deb.debian.org/debian}"

# What the Dockerfile and the processes use of the official image: python (3.11), pip (to
# install uv), CA certificates (pip and uv fetch over HTTPS), groupadd/useradd (minbase has them).
packages="python3.11,python3-pip,python-is-python3,ca-certificates"

# The root file system is put together in memory where there is room (most of the time goes
# to dpkg's writes), and dpkg skips its fsyncs: nothing here must survive a crash.
scratch=/var/tmp
if [[ -d /dev/shm && "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 2000000 ]]; then
  scratch=/dev/shm
fi
rootfs="$(mktemp -d "$scratch/eskit-base.XXXXXX")"
trap 'umount "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true; rm -rf --one-file-system "$rootfs"' EXIT
echo "building $tag: debootstrap bookworm from $mirror in $rootfs" >&2
debootstrap --variant=minbase --include="$packages" --foreign bookworm "$rootfs" "$mirror" >&2
mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" "$rootfs/usr/local/share/ca-certificates"
[[ ${#local_cas[@]} -eq 0 ]] || cp "${local_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
echo force-unsafe-io >"$rootfs/etc/dpkg/dpkg.cfg.d/eskit-unsafe-io"
chroot "$rootfs" /debootstrap/debootstrap --second-stage >&2
umount "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true
rm -f "$rootfs/etc/dpkg/dpkg.cfg.d/eskit-unsafe-io"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
# The official image's /usr/local/bin/python and pip are Debian's here; pip may install into
# the system Python (the official image allows it too: its Python is not Debian's).
tar -C "$rootfs" --numeric-owner --one-file-system -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$tag" >&2
echo "$tag"
