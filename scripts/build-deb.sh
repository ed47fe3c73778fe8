#!/usr/bin/env bash
# Build the Debian package of devid-agent from this tree: OUT_DIR/devid-agent_<version>_<arch>.deb
# (default OUT_DIR: dist/). Prints the package's path on stdout.
#
#   bash scripts/build-deb.sh [OUT_DIR]        (`make deb`; needs `make setup` first)
#
# What goes in (packaging/deb/ has the maintainer scripts, the pins and the copyright):
#   /opt/devid-agent/wheels/       devid-agent's own wheel (built from this tree's files) and the
#                                  pinned wheels of its dependencies (packaging/deb/requirements.txt);
#                                  postinst builds /opt/devid-agent/venv from them with --no-index,
#                                  so a gateway needs no access to a package index (postinst says why
#                                  the venv is built there and not here)
#   /opt/devid-agent/lib/ossl-modules/tpm2.so
#                                  the tpm2 OpenSSL provider >= 1.2 (Debian 13's 1.3.0, which works on
#                                  Debian 12; Debian 12's own 1.1.1 cannot sign TLS with a TPM key),
#                                  named by the shipped config's tpm.openssl_provider
#   /usr/bin/devid-agent           -> /opt/devid-agent/venv/bin/devid-agent
#   /lib/systemd/system/           the units (not enabled: the operator enables after configuring)
#   /usr/lib/sysusers.d/, /usr/lib/tmpfiles.d/   the service user and its directories
#   /etc/devid-agent/config.toml   conffile, from config.example.toml; 0640 root:devid-agent
#   /usr/share/doc/devid-agent/    README, docs, the example config, contrib examples, copyright
#
# Reproducible: the wheels are pinned (packaging/deb/requirements.txt) and cached in
# .deps/deb-wheels/<hash of the pins, the build tools and the interpreter>; tpm2-pytss is compiled
# from its source release with pinned build tools (build-requirements.txt), no debug info and the
# build directory mapped away; every timestamp is SOURCE_DATE_EPOCH (default: the HEAD commit's
# time), owners are root, and the same tree on the same Debian gives the same bytes, with or
# without the cache (tests/test_deb.py builds twice). Network: only the package registries (pip,
# apt), and only while filling the caches.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

die() { echo "build-deb: $*" >&2; exit 1; }
out=${1:-dist}
[ -x .venv/bin/devid-agent ] || die "no .venv: run \`make setup\` first"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
# The interpreter the package runs on (Debian's python3, not whatever python3 is first on PATH):
# the wheels are fetched for it and tpm2-pytss is compiled against its headers.
target_python=${DEB_PYTHON:-/usr/bin/python3}
[ -x "$target_python" ] || die "$target_python not found (Debian's python3; set DEB_PYTHON)"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export TZ=UTC LC_ALL=C.UTF-8 PYTHONHASHSEED=0
umask 022

version=$("$target_python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
pyver=$("$target_python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$target_python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
logs=$work/logs
mkdir -p "$logs"
run() {  # run NAME HINT CMD...: quiet on success; on failure one line and the log kept
  local name=$1 hint=$2; shift 2
  if ! "$@" >"$logs/$name.log" 2>&1; then
    local kept=${TMPDIR:-/tmp}/devid-agent-build-deb-$name.log
    cp "$logs/$name.log" "$kept"
    die "$name failed: $(grep -v '^[[:space:]]*$' "$kept" | tail -n 1)${hint:+ ($hint)}; full output: $kept"
  fi
}

# 1. A build venv of the target interpreter with the pinned build tools (our build backend and
#    tpm2-pytss's), all from wheels.
bvenv=$repo/.deps/deb-build-venv
bkey=$(cat packaging/deb/build-requirements.txt <("$target_python" -VV) | sha256sum | cut -c1-16)
if [ ! -f "$bvenv/.complete-$bkey" ]; then
  rm -rf "$bvenv"
  run build-venv "is python3-venv installed?" "$target_python" -m venv "$bvenv"
  run build-venv-pip "installing the pinned build tools; no network?" \
    "$bvenv/bin/python" -m pip install -q --only-binary :all: -r packaging/deb/build-requirements.txt
  touch "$bvenv/.complete-$bkey"
fi
pip=("$bvenv/bin/python" -m pip --disable-pip-version-check)

# 2. The dependencies' wheels, once per pin set, build tools and interpreter: the published
#    wheels as they are, and tpm2-pytss (no wheel is published: it links the system's libtss2)
#    compiled from its source release without debug info and with the build directory mapped
#    away, so that the same environment compiles the same bytes.
key=$(cat packaging/deb/requirements.txt packaging/deb/build-requirements.txt \
  <("$target_python" -VV; echo "$arch") | sha256sum | cut -c1-16)
wheels=.deps/deb-wheels/$key
if [ ! -f "$wheels/.complete" ]; then
  rm -rf "$wheels" "$wheels.tmp" && mkdir -p "$wheels.tmp"
  grep -v '^tpm2-pytss==' packaging/deb/requirements.txt > "$work/published.txt"
  tpm2_pytss=$(grep '^tpm2-pytss==' packaging/deb/requirements.txt)
  run pip-download "fetching the pinned wheels; no network?" \
    "${pip[@]}" download --no-deps --only-binary :all: -r "$work/published.txt" -d "$wheels.tmp"
  mkdir -p "$work/sdist" "$work/tpm2-pytss"
  run pip-download-sdist "fetching $tpm2_pytss's source; no network?" \
    "${pip[@]}" download --no-deps --no-binary tpm2-pytss --no-build-isolation "$tpm2_pytss" -d "$work/sdist"
  tar -C "$work/tpm2-pytss" --strip-components=1 -xzf "$work"/sdist/tpm2_pytss-*.tar.gz
  run build-tpm2-pytss "compiling $tpm2_pytss: is libtss2-dev installed?" \
    env -C "$work/tpm2-pytss" CFLAGS="-g0 -ffile-prefix-map=$work=/build" \
    "${pip[@]}" wheel --no-deps --no-build-isolation --no-index -w "$repo/$wheels.tmp" .
  touch "$wheels.tmp/.complete" && mv "$wheels.tmp" "$wheels"
fi

# 3. devid-agent's own wheel from the files of this tree (tracked or new, not ignored): the tree
#    itself is left untouched (no build/ or egg-info written).
src=$work/src
mkdir -p "$src"
git ls-files -z -co --exclude-standard -- pyproject.toml README.md agent hal |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -x -C "$src"
mkdir -p "$work/ours"
run wheel "building devid-agent's wheel" \
  "${pip[@]}" wheel --no-deps --no-build-isolation --no-index -w "$work/ours" "$src"

# The closure: devid-agent[tpm] resolves from these wheels alone (what postinst does).
run resolve "a dependency is missing from packaging/deb/requirements.txt" \
  "${pip[@]}" install --isolated --dry-run --ignore-installed --no-index \
  --find-links "$wheels" --find-links "$work/ours" "devid-agent[tpm]==$version"

# 4. The tpm2 provider >= 1.2, with its version and copyright.
provider=$(bash scripts/fetch-tpm2-openssl.sh .deps/tpm2-openssl) || exit 1
case $provider in
  "$repo"/.deps/*|.deps/*) pdir=.deps/tpm2-openssl; pversion=$(cat "$pdir/VERSION");
    pcopyright=$pdir/usr/share/doc/tpm2-openssl/copyright ;;
  *) pversion=$(dpkg-query -W -f='${Version}' tpm2-openssl);
    pcopyright=/usr/share/doc/tpm2-openssl/copyright ;;
esac

# 5. The tree of the package.
root=$work/root
opt=$root/opt/devid-agent
doc=$root/usr/share/doc/devid-agent
mkdir -p "$opt/wheels" "$opt/lib/ossl-modules" "$root/usr/bin" "$root/lib/systemd/system" \
  "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/etc/devid-agent" "$doc/docs" \
  "$root/DEBIAN"
install -m 0644 "$wheels"/*.whl "$work"/ours/*.whl "$opt/wheels/"
install -m 0644 "$provider" "$opt/lib/ossl-modules/tpm2.so"
echo "$pversion" > "$opt/lib/ossl-modules/tpm2.so.version"
ln -s /opt/devid-agent/venv/bin/devid-agent "$root/usr/bin/devid-agent"
install -m 0644 systemd/*.service "$root/lib/systemd/system/"
install -m 0644 systemd/sysusers.d/devid-agent.conf "$root/usr/lib/sysusers.d/"
install -m 0644 systemd/tmpfiles.d/devid-agent.conf "$root/usr/lib/tmpfiles.d/"
# The shipped config is the example with the bundled provider named (the only change).
provider_line='openssl_provider = "/opt/devid-agent/lib/ossl-modules/tpm2.so"'
sed "s|^openssl_provider = \"\"\$|# the package's bundled provider (tpm2-openssl $pversion; Debian 12's own 1.1.1 cannot work)\n$provider_line|" \
  config.example.toml > "$root/etc/devid-agent/config.toml"
grep -qx "$provider_line" "$root/etc/devid-agent/config.toml" ||
  die "config.example.toml has no line 'openssl_provider = \"\"' to point at the bundled provider"
chmod 0640 "$root/etc/devid-agent/config.toml"
install -m 0644 README.md config.example.toml "$doc/"
install -m 0644 docs/*.md "$doc/docs/"
mkdir -p "$doc/examples"
git ls-files -z -co --exclude-standard -- contrib |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -x -C "$doc/examples"
find "$doc/examples" -type f -exec chmod 0644 {} + && find "$doc/examples" -type d -exec chmod 0755 {} +
{ cat packaging/deb/copyright; cat "$pcopyright"; } > "$doc/copyright"
chmod 0644 "$doc/copyright"
# A manual page from --help (lintian: every command in /usr/bin has one).
mkdir -p "$root/usr/share/man/man1"
{
  echo ".TH DEVID-AGENT 1 \"$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)\" \"devid-agent $version\" \"User Commands\""
  echo ".SH NAME"
  echo "devid-agent \\- device-side trust agent: TPM keys, EST enrollment, signed A/B firmware"
  echo ".SH SYNOPSIS"
  echo ".nf"
  COLUMNS=80 "$repo/.venv/bin/devid-agent" --help | sed 's/\\/\\e/g; s/^[.'"'"']/\\\&&/'
  echo ".fi"
  echo ".SH SEE ALSO"
  echo "/usr/share/doc/devid-agent/README.md"
} | gzip -9n > "$root/usr/share/man/man1/devid-agent.1.gz"
# What lintian flags on purpose: /opt is where add-on software outside the Debian archive belongs
# (FHS 3.13), and the config is 0640 (root:devid-agent after postinst) because it may name secrets.
mkdir -p "$root/usr/share/lintian/overrides"
cat > "$root/usr/share/lintian/overrides/devid-agent" <<'OVERRIDES'
devid-agent: dir-or-file-in-opt [opt/devid-agent/*]
devid-agent: non-standard-file-perm 0640 != 0644 [etc/devid-agent/config.toml]
OVERRIDES
{
  echo "devid-agent ($version) unstable; urgency=medium"
  echo
  echo "  * Built from this tree by scripts/build-deb.sh (git $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
  echo
  echo " -- devid-agent maintainers <maintainers@devid-agent.example.org>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$doc/changelog.gz"

for script in postinst prerm postrm; do
  sed "s/#VERSION#/$version/g" "packaging/deb/$script" > "$root/DEBIAN/$script"
  chmod 0755 "$root/DEBIAN/$script"
done
echo /etc/devid-agent/config.toml > "$root/DEBIAN/conffiles"

# Run-time libraries of the compiled parts that are not carried inside their wheels (manylinux
# wheels bundle theirs): the provider and tpm2-pytss link Debian's libtss2.
mkdir -p "$work/shlibs/debian" "$work/shlibs/so"
printf 'Source: devid-agent\n\nPackage: devid-agent\nArchitecture: any\n' > "$work/shlibs/debian/control"
cp "$provider" "$work/shlibs/so/tpm2.so"
(cd "$work/shlibs/so" && for w in "$repo/$wheels"/tpm2_pytss-*.whl; do
  "$target_python" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n) for n in z.namelist() if n.endswith(".so")]' "$w"
done)
shlibs=$(cd "$work/shlibs" && find so -name '*.so' -print0 | xargs -0 dpkg-shlibdeps -O 2>"$logs/shlibdeps.log" |
  sed -n 's/^shlibs:Depends=//p') || die "dpkg-shlibdeps failed: $(tail -n 1 "$logs/shlibdeps.log")"
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no libraries for the provider and tpm2-pytss"

find "$root" -path "$root/DEBIAN" -prune -o -type f -print0 | sort -z |
  xargs -0 md5sum | sed "s|  $root/|  |" > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums" "$root/DEBIAN/conffiles"
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)

# procps: /bin/kill, the service's ExecReload (not in a minimal Debian; systemd-analyze verify
# fails without it). libtss2-tcti-device0: dlopen()ed by libtss2-tctildr for /dev/tpmrm0.
cat > "$root/DEBIAN/control" <<EOF
Package: devid-agent
Version: $version
Architecture: $arch
Maintainer: devid-agent maintainers <maintainers@devid-agent.example.org>
Installed-Size: $installed_size
Depends: python3 (>= $pyver), python3 (<< $pynext), python3-venv, systemd, procps, $shlibs, libtss2-tcti-device0
Suggests: libubootenv-tool | u-boot-tools, grub-common, tpm2-tools
Section: admin
Priority: optional
Description: device-side trust agent for Linux IoT gateways
 devid-agent owns a gateway's trust: it generates the device's keys inside
 the TPM, enrolls an operational (IEEE 802.1AR LDevID) certificate from an
 RFC 7030 EST server, renews it before it expires, uses it for mutual TLS,
 and verifies signed firmware before it goes into an A/B slot, with boot
 counting, commit and rollback.
 .
 The agent runs from its own virtual environment in /opt/devid-agent, built
 at installation from the Python wheels in this package (no network needed),
 with the tpm2 OpenSSL provider (>= 1.2) it needs for TLS with TPM keys. The
 units are installed but not enabled: configure
 /etc/devid-agent/config.toml, then enable them.
EOF
chmod 0644 "$root/DEBIAN/control"

find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb=$out/devid-agent_${version}_${arch}.deb
run dpkg-deb "" dpkg-deb --root-owner-group -Zxz -z9 --build "$root" "$deb.tmp"
mv "$deb.tmp" "$deb"
echo "$deb"
