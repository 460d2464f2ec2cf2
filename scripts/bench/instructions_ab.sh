#!/usr/bin/env bash
# Instructions per decoded token and per prompt token of two moe-run builds on the same files,
# counted by valgrind's callgrind on one thread: deterministic, so a small difference shows
# through the timing noise of a shared machine. Each figure is the difference of two runs, so
# loading the model cancels out.
#
#   scripts/bench/instructions_ab.sh OLD_MOE_RUN NEW_MOE_RUN MODEL.gguf [MODEL.gguf ...]
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n 2,7p "$0" >&2
  exit 2
fi
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
old=$1 new=$2
shift 2
ir() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'; }
printf '| file | build | instructions per decoded token | per prompt token |\n|---|---|---|---|\n'
for f in "$@"; do
  for b in old new; do
    exe=$old; [ $b = new ] && exe=$new
    base=$(ir "$exe" bench -m "$f" -p 0 -n 0 -r 1 -t 1 --json)
    n2=$(ir "$exe" bench -m "$f" -p 0 -n 2 -r 1 -t 1 --json)
    n6=$(ir "$exe" bench -m "$f" -p 0 -n 6 -r 1 -t 1 --json)
    p16=$(ir "$exe" bench -m "$f" -p 16 -n 0 -r 1 -t 1 --json)
    # bench runs each test once to warm up and then -r times: 2 runs of each.
    echo "| $(basename "$f") | $b | $(( (n6 - n2) / 8 )) | $(( (p16 - base) / 32 )) |"
  done
done
