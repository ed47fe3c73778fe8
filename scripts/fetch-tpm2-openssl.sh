#!/usr/bin/env bash
# Make a tpm2 OpenSSL provider >= 1.2 available to devid-agent's tests and demo.
#
# Debian 12 ships tpm2-openssl 1.1.1, which cannot sign TLS handshakes with a TPM key
# ("missing private key"): 1.2 made TPM keys non-exportable so that OpenSSL signs in the
# provider. When the system's provider is too old, this fetches Debian 13's package through a
# private, throw-away apt configuration (the system's apt sources stay untouched) and unpacks it
# into a project-local folder. Prints the path of the usable tpm2.so on stdout.
set -euo pipefail

dest=${1:?usage: fetch-tpm2-openssl.sh DEST_DIR}
suite=${TPM2_OPENSSL_SUITE:-trixie}
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
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
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work/deb" && apt-get "${apt_opts[@]}" -qq download tpm2-openssl >&2)
deb=$(ls "$work"/deb/tpm2-openssl_*.deb)
rm -rf "$dest" && mkdir -p "$dest"
dpkg-deb -x "$deb" "$dest"
dpkg-deb -f "$deb" Version > "$dest/VERSION"
[ -f "$local_so" ] || { echo "fetch-tpm2-openssl: $deb has no tpm2.so" >&2; exit 1; }
echo "$local_so"
