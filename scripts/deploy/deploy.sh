#!/usr/bin/env bash
# Deploy moed and moe-run with a model to a board over ssh, then check /health.
#
#   scripts/deploy/deploy.sh pi@raspberrypi.local --profile pi5 --model model.gguf
#
# Options:
#   --profile NAME      board profile (targets/profiles: pi5, pi4, zero2w, generic-aarch64,
#                       x86_64, auto; NAME:STORAGE like pi4:usb-ssd), written as
#                       MOED_TARGET_PROFILE into the daemon's settings            (default: auto)
#   --model FILE        the GGUF model to serve (copied unless the board has an identical one)
#   --target TRIPLE     Rust target to build for (default: aarch64-unknown-linux-gnu;
#                       x86_64-unknown-linux-gnu for a PC or to try the script on localhost)
#   --bin-dir DIR       deploy moed and moe-run from DIR instead of building them
#   --prefix DIR        user install without root: everything under DIR on the board, moed
#                       started directly (no systemd); the socket is DIR/moed.sock
#   --no-systemd        with a root install, start moed directly instead of via systemd
#   --ssh-opt OPT       extra ssh/scp -o option, repeatable (e.g. --ssh-opt IdentityFile=~/.ssh/pi)
#   --port N            ssh port
#   --health-timeout S  seconds to wait for /health to answer 200 (default 300: large models
#                       load slowly from microSD)
#
# System install (default; needs passwordless sudo on the board): /usr/local/bin/{moed,moe-run},
# /var/lib/moed/<model>, /etc/default/moed (targets/moed.env with MOED_MODEL and
# MOED_TARGET_PROFILE set), /etc/systemd/system/moed.service, a `moed` system user; then
# `systemctl enable moed` and `systemctl restart moed`. Without systemd on the board (or with
# --no-systemd) moed is started with nohup instead and its pid kept in /run/moed/moed.pid.
#
# Honours CARGO_TARGET_DIR. Building for aarch64 installs the cross toolchain when missing
# (scripts/deploy/cross-build.sh --setup-only).
set -euo pipefail
cd "$(dirname "$0")/../.."

die() {
  echo "deploy: error: $*" >&2
  exit 1
}
usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

host="" profile=auto model="" target=aarch64-unknown-linux-gnu bin_dir="" prefix=""
use_systemd=1 port="" health_timeout=300
ssh_opts=(-o BatchMode=yes -o ConnectTimeout=10)
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --model) model=${2:?--model needs a file}; shift 2 ;;
    --target) target=${2:?--target needs a Rust target triple}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a directory on the board}; shift 2 ;;
    --no-systemd) use_systemd=0; shift ;;
    --ssh-opt) ssh_opts+=(-o "${2:?--ssh-opt needs an option}"); shift 2 ;;
    --port) port=${2:?--port needs a number}; shift 2 ;;
    --health-timeout) health_timeout=${2:?}; shift 2 ;;
    -h | --help) usage 0 ;;
    -*) echo "deploy: unknown option $1" >&2; usage ;;
    *)
      [ -z "$host" ] || die "one host only (got $host and $1)"
      host=$1; shift ;;
  esac
done
[ -n "$host" ] || { echo "deploy: give the board as user@host" >&2; usage; }
[ -n "$model" ] || die "give the model to serve: --model FILE.gguf"
[ -f "$model" ] || die "model $model not found"
[ "$(head -c 4 "$model")" = GGUF ] || die "$model is not a GGUF file (convert it with moe-convert first)"
pname=${profile%%:*}
case "$pname" in
  auto | none) ;;
  *) [ -f "targets/profiles/$pname.toml" ] ||
       die "unknown profile $pname: use auto or one of $(ls targets/profiles | sed 's/\.toml$//' | paste -sd ' ')" ;;
esac
[ -z "$port" ] || ssh_opts+=(-o "Port=$port")
case "$target" in
  aarch64-unknown-linux-gnu) want_arch=aarch64 ;;
  x86_64-unknown-linux-gnu) want_arch=x86_64 ;;
  armv7-unknown-linux-gnueabihf) want_arch=armv7l ;;
  *) die "unsupported --target $target (aarch64-unknown-linux-gnu, x86_64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" ;;
esac

remote() { ssh "${ssh_opts[@]}" "$host" "$@"; }
# Runs a script on the board with bash; arguments become $1, $2, ... (quoted: ssh joins its
# arguments into one command line, which would drop empty ones and split spaced ones).
remote_script() {
  local script=$1
  shift
  remote "bash -s -- $(printf '%q ' "$@")" <<<"$script"
}

# --- the board: reachable, right architecture, root or not -------------------------------
echo "== checking $host"
info=$(remote 'uname -m; id -u; command -v systemctl >/dev/null && [ -d /run/systemd/system ] && echo systemd || echo no-systemd; command -v curl >/dev/null && echo curl || echo no-curl; command -v rsync >/dev/null && echo rsync || echo no-rsync') ||
  die "cannot run commands on $host over ssh (needs key-based login: ssh-copy-id $host)"
mapfile -t facts <<<"$info"
board_arch=${facts[0]} board_uid=${facts[1]} board_init=${facts[2]} board_curl=${facts[3]} board_rsync=${facts[4]}
echo "board: $board_arch, uid $board_uid, $board_init, $board_curl"
if [ "$board_arch" != "$want_arch" ]; then
  hint=""
  [ "$board_arch" = armv7l ] && hint=" (a 32-bit OS: use --target armv7-unknown-linux-gnueabihf or a 64-bit Raspberry Pi OS)"
  [ "$board_arch" = aarch64 ] && hint=" (use the default --target aarch64-unknown-linux-gnu)"
  die "$host is $board_arch but the build is for $target$hint"
fi
[ "$board_curl" = curl ] || die "$host has no curl, which the /health check needs: sudo apt-get install curl"

if [ -n "$prefix" ]; then
  mode=user
  use_systemd=0
  sudo=""
else
  mode=system
  if [ "$board_uid" = 0 ]; then
    sudo=""
  else
    remote 'sudo -n true' 2>/dev/null ||
      die "a system install needs passwordless sudo on $host; or install as this user with --prefix DIR"
    sudo="sudo -n"
  fi
  if [ "$use_systemd" = 1 ] && [ "$board_init" != systemd ]; then
    echo "note: $host does not run systemd; starting moed directly"
    use_systemd=0
  fi
fi

# --- binaries ---------------------------------------------------------------------------
if [ -z "$bin_dir" ]; then
  echo "== building moed and moe-run (release) for $target"
  case "$target" in
    aarch64-unknown-linux-gnu) scripts/deploy/cross-build.sh --setup-only ;;
    *) grep -qx "$target" <<<"$(rustup target list --installed)" || rustup target add "$target" ;;
  esac
  start=$(date +%s)
  cargo build --release --target "$target" --bin moed --bin moe-run
  echo "build: $(($(date +%s) - start)) s"
  bin_dir="${CARGO_TARGET_DIR:-target}/$target/release"
fi
for b in moed moe-run; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing"
done

# --- settings: targets/moed.env with the model and profile filled in ----------------------
model_name=$(basename "$model")
if [ "$mode" = system ]; then
  bin=/usr/local/bin data=/var/lib/moed env_file=/etc/default/moed
  socket=/run/moed/moed.sock run_dir=/run/moed
else
  bin=$prefix/bin data=$prefix env_file=$prefix/moed.env
  socket=$prefix/moed.sock run_dir=$prefix
fi
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
sed -e "s|^MOED_MODEL=.*|MOED_MODEL=$data/$model_name|" \
  -e "s|^MOED_TARGET_PROFILE=.*|MOED_TARGET_PROFILE=$profile|" \
  -e "s|^MOED_SOCKET=.*|MOED_SOCKET=$socket|" \
  targets/moed.env >"$staging/moed.env"
if [ "$mode" = user ]; then
  # No `moed` group for a user install: the socket is the user's alone.
  sed -i -e 's|^MOED_SOCKET_GROUP=|#MOED_SOCKET_GROUP=|' -e 's|^MOED_SOCKET_MODE=.*|MOED_SOCKET_MODE=600|' "$staging/moed.env"
fi
grep -q "^MOED_TARGET_PROFILE=$profile\$" "$staging/moed.env" || die "targets/moed.env has no MOED_TARGET_PROFILE line"

# --- copy ------------------------------------------------------------------------------
tmp=$(remote 'mktemp -d /tmp/moe-deploy.XXXXXX') || die "cannot create a directory on $host"
copy() { # local files... remote-dir
  local dest=${*: -1}
  scp -q "${ssh_opts[@]}" "${@:1:$#-1}" "$host:$dest"
}
echo "== copying binaries and settings"
copy "$bin_dir/moed" "$bin_dir/moe-run" "$staging/moed.env" targets/moed.service "$tmp/" ||
  die "copying to $host:$tmp failed (scp needs the board's sftp server)"

echo "== copying the model ($(du -h "$model" | cut -f1))"
local_size=$(stat -c %s "$model")
remote_size=$(remote "stat -c %s '$data/$model_name' 2>/dev/null || echo none")
if [ "$remote_size" = "$local_size" ] &&
  [ "$(remote "sha256sum '$data/$model_name'" | cut -d' ' -f1)" = "$(sha256sum "$model" | cut -d' ' -f1)" ]; then
  echo "the board already has this model ($data/$model_name, same sha256); not copying it again"
  model_staged=""
elif [ "$board_rsync" = rsync ] && command -v rsync >/dev/null 2>&1; then
  rsync --partial --info=progress2 -e "ssh ${ssh_opts[*]}" "$model" "$host:$tmp/$model_name" ||
    die "copying the model to $host:$tmp failed (disk full?)"
  model_staged=$tmp/$model_name
else
  copy "$model" "$tmp/" || die "copying the model to $host:$tmp failed (disk full?)"
  model_staged=$tmp/$model_name
fi

# --- install and start ---------------------------------------------------------------------
echo "== installing ($mode install, $([ "$use_systemd" = 1 ] && echo systemd || echo 'started directly'))"
install_script='
set -euo pipefail
tmp=$1 mode=$2 bin=$3 data=$4 env_file=$5 run_dir=$6 model_staged=$7 use_systemd=$8 sudo=${9:-}
if [ "$mode" = system ]; then
  id moed >/dev/null 2>&1 || $sudo useradd --system --home-dir /var/lib/moed --shell /usr/sbin/nologin moed
  $sudo install -d -o moed -g moed -m 750 "$data"
  $sudo install -m 644 "$tmp/moed.env" "$env_file"
else
  install -d "$bin" "$data"
  install -m 600 "$tmp/moed.env" "$env_file"
fi
$sudo install -d "$bin"
$sudo install -m 755 "$tmp/moed" "$tmp/moe-run" "$bin/"
if [ -n "$model_staged" ]; then
  if [ "$mode" = system ]; then
    $sudo install -o moed -g moed -m 640 "$model_staged" "$data/"
  else
    mv "$model_staged" "$data/"
  fi
fi
if [ "$use_systemd" = 1 ]; then
  $sudo install -m 644 "$tmp/moed.service" /etc/systemd/system/moed.service
  $sudo systemctl daemon-reload
  $sudo systemctl enable moed
  $sudo systemctl restart moed
else
  # Started directly: stop the moed this script started last time (its pid file), then start
  # a new one with the settings file exported as its environment.
  pidfile=$run_dir/moed.pid
  $sudo install -d "$run_dir"
  [ "$mode" = system ] && $sudo chown moed:moed "$run_dir"
  if [ -f "$pidfile" ] && old=$(cat "$pidfile") && $sudo kill -0 "$old" 2>/dev/null; then
    $sudo kill -TERM "$old"
    for _ in $(seq 50); do $sudo kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
  fi
  start="set -a; . $env_file; set +a; exec $bin/moed"
  if [ "$mode" = system ]; then
    $sudo touch "$pidfile" "$data/moed.log"
    $sudo chown moed:moed "$pidfile" "$data/moed.log"
    if [ -n "$sudo" ]; then as_moed=(sudo -n -u moed); else as_moed=(runuser -u moed --); fi
    "${as_moed[@]}" sh -c "nohup sh -c \"$start\" >$data/moed.log 2>&1 </dev/null & echo \$! >$pidfile"
  else
    nohup sh -c "$start" >"$data/moed.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
  fi
  echo "moed started directly (pid $(cat "$pidfile")), log: $data/moed.log"
fi
rm -rf "$tmp"
'
remote_script "$install_script" "$tmp" "$mode" "$bin" "$data" "$env_file" "$run_dir" \
  "$model_staged" "$use_systemd" "$sudo" || die "installing on $host failed (see above)"

# --- /health over the socket -------------------------------------------------------------
echo "== waiting for $socket /health (up to $health_timeout s)"
health_script='
socket=$1 timeout=$2 sudo=${3:-}
out=$(mktemp)
trap "rm -f $out" EXIT
end=$(( $(date +%s) + timeout ))
while :; do
  code=$($sudo curl -s -o "$out" -w "%{http_code}" --unix-socket "$socket" http://localhost/health) || code=000
  if [ "$code" = 200 ]; then cat "$out"; exit 0; fi
  if [ "$(date +%s)" -ge "$end" ]; then echo "last answer: HTTP $code $(cat "$out")"; exit 1; fi
  sleep 1
done
'
if health=$(remote_script "$health_script" "$socket" "$health_timeout" "$sudo"); then
  echo "health: $health"
  echo "moed is up on $host:$socket (profile $profile, model $data/$model_name)"
  echo "start-up line:"
  if [ "$use_systemd" = 1 ]; then
    remote "$sudo journalctl -u moed -b --no-pager -o cat | grep 'cpu:' | tail -1" || true
  else
    remote "grep 'cpu:' '$data/moed.log' | tail -1" || true
  fi
else
  echo "$health" >&2
  if [ "$use_systemd" = 1 ]; then
    remote "$sudo systemctl status moed --no-pager; $sudo journalctl -u moed -n 30 --no-pager" >&2 || true
  else
    remote "tail -n 30 '$data/moed.log'" >&2 || true
  fi
  die "moed on $host did not report healthy within $health_timeout s (its log is above)"
fi
