#!/usr/bin/env bash
# Make a tpm2 OpenSSL provider >= 1.2 available to devid-agent's tests and demo.
#
# Debian 12 ships tpm2-openssl 1.1.1, which cannot sign TLS handshakes with a TPM key
# ("missing private key"): 1.2 made TPM keys non-exportable so that OpenSSL signs in the
# provider. When the system's provider is too old, this fetches Debian 13's package through a
# private, throw-away apt configuration (the system's apt sources stay untouched) and unpacks it
# into a project-local folder. Prints the path of the usable tpm2.so on stdout.
#
# Every failure ends with one line on stderr (what failed, the tool's last words, the likely
# cause and where its full output was kept) and a non-zero exit status.
set -euo pipefail

die() { echo "fetch-tpm2-openssl: $*" >&2; exit 1; }
dest=${1:?usage: fetch-tpm2-openssl.sh DEST_DIR}
suite=${TPM2_OPENSSL_SUITE:-trixie}
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null) ||
  die "cannot tell this system's multiarch triplet (needs dpkg-dev or gcc)"
system_so=/usr/lib/$multiarch/ossl-modules/tpm2.so
local_so=$dest/usr/lib/$multiarch/ossl-modules/tpm2.so

version_of() {  # the Debian package version that installed a provider, or nothing
  dpkg-query -W -f='${Version}' tpm2-openssl 2>/dev/null || true
}
new_enough() {  # "1.2.0-1" -> true when >= 1.2
  dpkg --compare-versions "$1" ge 1.2~ 2>/dev/null
}

if [ -f "$system_so" ] && new_enough "$(version_of)"; then
  echo "$system_so"; exit 0
fi
if [ -f "$local_so" ] && [ -f "$dest/VERSION" ] && new_enough "$(cat "$dest/VERSION")"; then
  echo "$local_so"; exit 0
fi

# The mirror is the one the system already uses for Debian's main archive.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "fetch-tpm2-openssl: cannot find the system's Debian mirror" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
cat > "$work/parts/$suite.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$work/parts"
          -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
          -o Dir::State::Status=/var/lib/dpkg/status -o APT::Get::List-Cleanup=0
          -o Acquire::Languages=none -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
# run STEP HINT CMD...: quiet on success; on failure one line, and the log kept.
run() {
  local name=$1 hint=$2; shift 2
  local log=$work/$name.log
  if ! "$@" >"$log" 2>&1; then
    local kept=${TMPDIR:-/tmp}/devid-agent-fetch-$name.log
    cp "$log" "$kept" 2>/dev/null || kept="(lost)"
    local last
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)
    die "$name failed${last:+: $last} ($hint); full output: $kept"
  fi
}
run apt-get-update "fetching Debian $suite's package lists from $mirror: no network?" \
  apt-get "${apt_opts[@]}" -qq update
run apt-get-download "downloading Debian $suite's tpm2-openssl from $mirror: no network?" \
  bash -c 'cd "$1" && shift && apt-get "$@" -qq download tpm2-openssl' _ "$work/deb" "${apt_opts[@]}"
deb=$(ls "$work"/deb/tpm2-openssl_*.deb 2>/dev/null | head -n 1) ||
  die "apt-get download left no tpm2-openssl .deb in $work/deb"
[ -n "$deb" ] || die "apt-get download left no tpm2-openssl .deb"
new_enough "$(dpkg-deb -f "$deb" Version)" ||
  die "Debian $suite's tpm2-openssl is $(dpkg-deb -f "$deb" Version), not >= 1.2 (set TPM2_OPENSSL_SUITE)"
rm -rf "$dest" && mkdir -p "$dest"
dpkg-deb -x "$deb" "$dest"
dpkg-deb -f "$deb" Version > "$dest/VERSION"
[ -f "$local_so" ] || { echo "fetch-tpm2-openssl: $deb has no tpm2.so" >&2; exit 1; }
echo "$local_so"
