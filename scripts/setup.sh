#!/usr/bin/env bash
# Install everything devid-agent's tests and demo need, idempotently; fast when nothing is missing.
#   1. Debian packages (swtpm, libtss2, mosquitto, u-boot-tools, grub-common, rauc, ...;
#      dpkg-dev for `make deb`'s dpkg-shlibdeps)
#   2. a tpm2 OpenSSL provider >= 1.2 (system's, or Debian 13's unpacked into .deps/), and
#      Debian 12's 1.1.1 beside it for the test that proves an old provider is refused
#   3. .venv with `pip install -e .[test]`
# Every failure ends with one line on stderr saying which step failed and why (the tool's own
# output is kept in a log file named on that line), and a non-zero exit status.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "setup: $*" >&2; exit 1; }
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# run STEP HINT CMD...: run quietly; on failure keep the log and say in one line what failed,
# the tool's last words and the likely cause.
run() {
  local name=$1 hint=$2; shift 2
  local log=$logs/$name.log
  if ! "$@" >"$log" 2>&1; then
    local kept=${TMPDIR:-/tmp}/devid-agent-setup-$name.log
    cp "$log" "$kept" 2>/dev/null || kept=$log
    local last
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)
    die "$name failed${last:+: $last}${hint:+ ($hint)}; full output: $kept"
  fi
}

python=${PYTHON:-python3}

packages=(swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config gcc libc6-dev libffi-dev
          python3-venv python3-dev openssl mosquitto u-boot-tools grub-common ca-certificates
          systemd libubootenv-tool rauc dbus-daemon squashfs-tools swupdate mender-client
          mender-artifact dpkg-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root to install ${missing[*]}: run as root, or install sudo"
    sudo_cmd=(sudo)
  fi
  # Wait for another apt/dpkg (unattended-upgrades) instead of failing at once on its lock.
  apt_lock=(-o DPkg::Lock::Timeout=300)
  run apt-get-update "no network, or another apt holds the lock?" \
    "${sudo_cmd[@]}" apt-get "${apt_lock[@]}" update -qq
  run apt-get-install "no network, or another apt holds the lock?" \
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_lock[@]}" install -y -qq \
    --no-install-recommends "${missing[@]}"
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
  die "devid-agent needs Python >= 3.10; $python is $("$python" -V 2>&1 || echo missing) (set PYTHON=...)"

mkdir -p .deps
provider=$(bash scripts/fetch-tpm2-openssl.sh .deps/tpm2-openssl) || exit 1  # it said why
echo "$provider" > .deps/tpm2-provider.path
# Debian 12's own provider (1.1.1), which cannot work: the tests prove the agent refuses it clearly.
if [ ! -f .deps/tpm2-openssl-old/VERSION ]; then
  old=$logs/old-provider
  mkdir -p "$old"
  # From the system's apt lists; refresh them once if they are empty or stale.
  if ! (cd "$old" && apt-get -qq -o APT::Sandbox::User=root download tpm2-openssl) >/dev/null 2>&1; then
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    run apt-get-update "no network, or another apt holds the lock?" \
      "${sudo_cmd[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
    run download-old-tpm2-openssl "Debian 12's tpm2-openssl 1.1.1, for a test; no network?" \
      bash -c 'cd "$1" && apt-get -qq -o APT::Sandbox::User=root download tpm2-openssl' _ "$old"
  fi
  rm -rf .deps/tpm2-openssl-old
  run unpack-old-tpm2-openssl "" dpkg-deb -x "$old"/tpm2-openssl_*.deb .deps/tpm2-openssl-old
  dpkg-deb -f "$old"/tpm2-openssl_*.deb Version > .deps/tpm2-openssl-old/VERSION.tmp
  mv .deps/tpm2-openssl-old/VERSION.tmp .deps/tpm2-openssl-old/VERSION
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv  # a half-made venv (e.g. without ensurepip) would be "found" on every re-run
  run python-venv "is python3-venv installed?" "$python" -m venv .venv
fi
stamp=.venv/.installed-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  run pip-upgrade "no network?" .venv/bin/python -m pip install -q --upgrade pip
  run pip-install "no network, or libtss2-dev missing?" .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
