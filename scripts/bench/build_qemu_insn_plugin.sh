#!/usr/bin/env bash
# Builds QEMU's `insn` TCG plugin (tests/plugin/insn.c in QEMU's sources), which counts the
# instructions a guest executes, for the installed qemu-aarch64 (Debian's qemu-user supports
# -plugin but ships no plugins). The plugin must come from the same QEMU release as the emulator.
#
#   scripts/bench/build_qemu_insn_plugin.sh [OUT_DIR=../qemu-plugins]
#
# Sources: QEMU_SRC if it names an unpacked QEMU source tree of that release, else `apt-get
# source qemu` (needs deb-src entries in the apt sources). Needs gcc and libglib2.0-dev.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(realpath -m "${1:-$root/../qemu-plugins}")
mkdir -p "$out"
src=${QEMU_SRC:-}
if [ -z "$src" ]; then
  work="$out/src"
  mkdir -p "$work"
  if ! ls -d "$work"/qemu-*/ >/dev/null 2>&1; then
    (cd "$work" && apt-get source --download-only qemu) || {
      echo "could not fetch QEMU's sources: add deb-src entries to the apt sources, or set QEMU_SRC to an unpacked QEMU source tree of $(qemu-aarch64 --version | head -1)" >&2
      exit 1
    }
    tar -C "$work" -xJf "$(ls "$work"/qemu_*.orig.tar.xz | head -1)" --wildcards \
      '*/include/qemu/qemu-plugin.h' '*/tests/plugin/*'
  fi
  src=$(ls -d "$work"/qemu-*/ | head -1)
fi
pkg-config --exists glib-2.0 || { echo "install libglib2.0-dev" >&2; exit 1; }
# shellcheck disable=SC2046
gcc -O2 -shared -fPIC -I"$src/include/qemu" $(pkg-config --cflags glib-2.0) \
  "$src/tests/plugin/insn.c" -o "$out/libinsn.so" $(pkg-config --libs glib-2.0)
echo "$out/libinsn.so"
