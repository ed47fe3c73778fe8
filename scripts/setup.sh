#!/usr/bin/env bash
# Install everything devid-agent's tests and demo need, idempotently; fast when nothing is missing.
#   1. Debian packages (swtpm, libtss2, mosquitto, u-boot-tools, grub-common, ...)
#   2. a tpm2 OpenSSL provider >= 1.2 (system's, or Debian 13's unpacked into .deps/), and
#      Debian 12's 1.1.1 beside it for the test that proves an old provider is refused
#   3. .venv with `pip install -e .[test]`
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config gcc libc6-dev libffi-dev
          python3-venv python3-dev openssl mosquitto u-boot-tools grub-common ca-certificates
          systemd libubootenv-tool)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

mkdir -p .deps
provider=$(bash scripts/fetch-tpm2-openssl.sh .deps/tpm2-openssl)
echo "$provider" > .deps/tpm2-provider.path
# Debian 12's own provider (1.1.1), which cannot work: the tests prove the agent refuses it clearly.
if [ ! -f .deps/tpm2-openssl-old/VERSION ]; then
  old=$(mktemp -d)
  (cd "$old" && apt-get -qq -o APT::Sandbox::User=root download tpm2-openssl >/dev/null)
  rm -rf .deps/tpm2-openssl-old && dpkg-deb -x "$old"/tpm2-openssl_*.deb .deps/tpm2-openssl-old
  dpkg-deb -f "$old"/tpm2-openssl_*.deb Version > .deps/tpm2-openssl-old/VERSION
  rm -rf "$old"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
