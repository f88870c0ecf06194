#!/usr/bin/env bash
# The base image's root filesystem: debootstrap --variant=minbase bookworm, normalised so that two
# runs give the same bytes, packed as a tar with sorted names, fixed mtimes and numeric owners.
# Writes ROOTFS_TAR and the installed Debian packages (package=version) to LOCK_OUT.
#   usage: mkrootfs.sh ROOTFS_TAR LOCK_OUT      (as root; SOURCE_DATE_EPOCH fixes every date)
set -euo pipefail

tar_out=$1
lock_out=$2
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
epoch=${SOURCE_DATE_EPOCH:?set SOURCE_DATE_EPOCH}

work=$(mktemp -d "${TMPDIR:-/tmp}/oqvl-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

debootstrap --variant=minbase --arch=amd64 "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 40 "$work/debootstrap.log" >&2; exit 1; }

dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}=${Version}\n' | LC_ALL=C sort >"$lock_out"

# What differs between two runs, or leaks from the host: logs, caches, downloaded indexes,
# backup files, the host's name and resolver, device nodes (the runtime provides /dev).
rm -rf "$root"/var/log/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/ldconfig/aux-cache "$root"/var/cache/debconf/*-old \
  "$root"/var/lib/dpkg/*-old "$root"/etc/*- "$root"/dev/* "$root"/run/* "$root"/tmp/*
mkdir -p "$root/var/lib/apt/lists/partial"
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"
# Password-change dates (days since 1970) as of SOURCE_DATE_EPOCH, not of the build day.
days=$((epoch / 86400))
awk -F: -v OFS=: -v d="$days" '$3 != "" { $3 = d } { print }' "$root/etc/shadow" >"$work/shadow"
cat "$work/shadow" >"$root/etc/shadow"  # rewritten in place: keeps the file's owner and mode

tar --sort=name --mtime="@$epoch" --numeric-owner \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$root" -cf "$tar_out" .
