#!/usr/bin/env bash
# Release builds of moe-run, moed and moe-convert for 64-bit Raspberry Pi OS (and other aarch64 glibc
# Linux), cross-compiled on an x86_64 Debian/Ubuntu host. Installs what is missing first.
#
#   scripts/deploy/cross-build.sh                           build, then report sizes and library needs
#   scripts/deploy/cross-build.sh --setup-only [--qemu]     only install the toolchain (and qemu-user);
#                                                    scripts/check/qemu-test.sh uses this
#
# The linker and the test runner come from .cargo/config.toml. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET=aarch64-unknown-linux-gnu

setup() {
  local with_qemu=$1
  if ! command -v cargo >/dev/null 2>&1 || ! command -v rustup >/dev/null 2>&1; then
    echo "cargo/rustup not found: install Rust (https://rustup.rs) and run this again" >&2
    exit 1
  fi
  if ! grep -qx "$TARGET" <<<"$(rustup target list --installed)"; then
    rustup target add "$TARGET"
  fi

  # Debian/Ubuntu package names; on an aarch64 host the native gcc provides the same linker name.
  local missing=()
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
  command -v file >/dev/null 2>&1 || missing+=(file)
  if [ "$(uname -m)" != aarch64 ]; then
    [ -e /usr/aarch64-linux-gnu/lib/libc.so ] || missing+=(libc6-dev-arm64-cross)
    if [ "$with_qemu" = 1 ]; then
      command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
    fi
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
      echo "missing packages: ${missing[*]}" >&2
      echo "install them (Debian/Ubuntu): sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
}

case "${1:-}" in
  --setup-only)
    setup "$([ "${2:-}" = --qemu ] && echo 1 || echo 0)"
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: $0 [--setup-only [--qemu]]" >&2
    exit 2
    ;;
esac

setup 0
start=$(date +%s)
cargo build --release --target "$TARGET" --bin moe-run --bin moed --bin moe-convert
echo "release build: $(($(date +%s) - start)) s"

if command -v aarch64-linux-gnu-readelf >/dev/null 2>&1; then
  readelf=aarch64-linux-gnu-readelf
else
  readelf=readelf
fi
# A Pi has glibc and little else: the binaries must not need any other shared library.
allowed=" libc.so.6 libm.so.6 libgcc_s.so.1 ld-linux-aarch64.so.1 libpthread.so.0 libdl.so.2 "
out_dir="${CARGO_TARGET_DIR:-target}/$TARGET/release"
status=0
for bin in moe-run moed moe-convert; do
  path="$out_dir/$bin"
  echo
  echo "== $path"
  file "$path"
  stripped=$(mktemp)
  aarch64-linux-gnu-strip -o "$stripped" "$path" 2>/dev/null || strip -o "$stripped" "$path"
  echo "size: $(stat -c %s "$path") bytes ($(stat -c %s "$stripped") bytes stripped)"
  rm -f "$stripped"
  needed=$("$readelf" -d "$path" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  echo "needs: $(echo "$needed" | paste -sd " " -)"
  for lib in $needed; do
    if [[ "$allowed" != *" $lib "* ]]; then
      echo "error: $bin needs $lib, which is not part of glibc" >&2
      status=1
    fi
  done
  # The oldest glibc that can run it (Raspberry Pi OS 12 has 2.36, 11 has 2.31).
  echo "newest glibc symbol version: $("$readelf" -V --wide "$path" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
done
exit $status
