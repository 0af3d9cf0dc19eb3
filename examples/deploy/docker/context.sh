#!/bin/sh
# Prepares the build context of examples/deploy/docker/Dockerfile from a `writ` binary
# built on this machine: the binary, the shared libraries it links (as `ldd` lists
# them, the dynamic loader included), the CA roots for OpenID Provider discovery, and a
# `writ` user (10001). Nothing is downloaded, so the image builds with no registry:
#
#   cargo build --release -p writ-cli --bin writ
#   examples/deploy/docker/context.sh target/release/writ /tmp/writ-image
#   docker build -t writ:dev /tmp/writ-image
#
# The binary is copied stripped of debug information when `strip` is present.
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: $0 WRIT_BINARY CONTEXT_DIR" >&2
  exit 2
fi
binary=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -x "$binary" ]; then
  echo "$0: $binary is not an executable (cargo build --release -p writ-cli --bin writ)" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$out/rootfs/usr/local/bin" "$out/rootfs/etc/ssl/certs" "$out/rootfs/tmp" \
  "$out/writable/var/lib/writ/server" "$out/writable/var/lib/writ/agent" \
  "$out/writable/var/lib/writ/txn" "$out/writable/run/writ" "$out/writable/run/writ-server" \
  "$out/writable/bootstrap"
chmod 1777 "$out/rootfs/tmp"
chmod 0700 "$out/writable/var/lib/writ/server" "$out/writable/var/lib/writ/agent" \
  "$out/writable/var/lib/writ/txn"
chmod 0755 "$out/writable/run/writ" "$out/writable/bootstrap"
chmod 0700 "$out/writable/run/writ-server"

cp "$binary" "$out/rootfs/usr/local/bin/writ"
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$out/rootfs/usr/local/bin/writ"
fi

# Every absolute path ldd prints: the libraries and the loader, at the same paths.
ldd "$binary" | grep -o '/[^ )]*' | sort -u | while read -r lib; do
  mkdir -p "$out/rootfs$(dirname "$lib")"
  cp -L "$lib" "$out/rootfs$lib"
done

if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$out/rootfs/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/:/sbin/nologin\nwrit:x:10001:10001:writ:/var/lib/writ:/sbin/nologin\n' \
  > "$out/rootfs/etc/passwd"
printf 'root:x:0:\nwrit:x:10001:\n' > "$out/rootfs/etc/group"

cp "$here/Dockerfile" "$out/Dockerfile"
echo "$out: build context ready ($(du -sh "$out" | cut -f1)); docker build -t writ:dev $out"
