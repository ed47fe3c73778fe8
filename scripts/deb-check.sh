#!/usr/bin/env bash
# The fresh-Debian check of the package (`make deb-check`): install dist/devid-agent_*.deb on a
# fresh Debian 12 root, not on this machine, see that it works, then remove and purge it.
#
#   sudo bash scripts/deb-check.sh dist/devid-agent_<version>_<arch>.deb
#
# The root is a minimal bookworm (mmdebstrap --variant=minbase: Essential and Priority: required
# packages and apt, nothing of this machine) from the mirrors this machine's apt already uses,
# cached as a tarball in .deps/deb-check/ (a rerun unpacks it in about a second). Inside it, in a
# chroot within a private mount namespace (so nothing stays mounted; systemd-nspawn needs a
# booted systemd, which a CI container lacks):
#   apt-get install ./devid-agent_*.deb        pulls the Depends from the Debian archive
#   devid-agent --version                      the launcher and the venv built by postinst
#   the service user (in group tss), the state directories, the config's mode and owner
#   devid-agent config check                   on the shipped config: must print OK
#   devid-agent doctor --json                  must print JSON: a list of named checks with a
#                                              known status; the config is ok and the bundled
#                                              provider loads (tls_provider ok, version >= 1.2);
#                                              errors about the missing TPM and EST are expected
#   systemd-analyze verify                     the installed units, with /usr/bin/devid-agent
#   reinstall (the upgrade path), remove (state and config kept, venv gone), purge (all gone)
# and prints how long each part took. Needs root (mmdebstrap, chroot, mounts) and apt access to
# the Debian archive (first run: the bootstrap; every run: the package's Depends).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "deb-check: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap, chroot and mounts)"
deb=${1:?usage: deb-check.sh PATH/devid-agent_VERSION_ARCH.deb}
[ -f "$deb" ] || die "$deb: no such package (run \`make deb\`)"
version=$(dpkg-deb -f "$deb" Version)

t0=$(date +%s.%N)
mark=$t0
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
phase() { echo "deb-check: $1 ($(elapsed "$mark") s)"; mark=$(date +%s.%N); }

# The system's own mirrors (deb822 or one-line format), so no host is named here.
sources=/etc/apt/sources.list.d/debian.sources
if [ -f "$sources" ]; then
  mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$sources")
  security=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' "$sources")
else
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  security=$(awk '$1 == "deb" && $0 ~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || die "cannot find this system's Debian mirror in /etc/apt/sources.list*"
security=${security:-${mirror%/debian}/debian-security}

suite=bookworm
key=$(printf '%s %s %s minbase' "$suite" "$mirror" "$security" | sha256sum | cut -c1-12)
cache=.deps/deb-check/$suite-minbase-$key.tar
if [ ! -f "$cache" ]; then
  if ! command -v mmdebstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
      --no-install-recommends mmdebstrap >/dev/null || die "cannot install mmdebstrap"
  fi
  mkdir -p .deps/deb-check
  rm -rf .deps/deb-check/"$suite"-minbase-*.tar  # an older mirror's
  rm -rf ".deps/deb-check/partial.tar"
  mmdebstrap --variant=minbase --quiet "$suite" .deps/deb-check/partial.tar \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb $security $suite-security main" || die "mmdebstrap of $suite from $mirror failed"
  mv .deps/deb-check/partial.tar "$cache"
  phase "bootstrapped a minimal Debian $suite into $cache"
fi

root=$(mktemp -d /var/tmp/devid-agent-deb-check.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT
tar -C "$root" -xf "$cache"
grep -q "^VERSION_CODENAME=$suite$" "$root/etc/os-release" || die "$cache is not Debian $suite"
cp "$deb" "$root/tmp/"
cp /etc/resolv.conf "$root/etc/resolv.conf"
phase "unpacked a fresh Debian $(cat "$root/etc/debian_version") root (cached tarball)"

cat > "$root/tmp/check.sh" <<'CHECK'
set -euo pipefail
version=$1
fail() { echo "deb-check: FAILED: $*" >&2; exit 1; }
mark=$(date +%s.%N)
phase() {
  echo "deb-check: $1 ($(awk -v a="$mark" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s)"
  mark=$(date +%s.%N)
}
export DEBIAN_FRONTEND=noninteractive
! command -v python3 >/dev/null || fail "the fresh root already has python3: not minimal"

apt-get update -qq
echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' > /etc/apt/apt.conf.d/keep-cache
cd /tmp
apt-get install -y -qq ./devid-agent_*.deb > /tmp/install.log 2>&1 || { tail -n 20 /tmp/install.log; fail "apt-get install"; }
phase "apt-get install ./devid-agent_${version}_*.deb (with its Depends from the archive)"

[ "$(devid-agent --version)" = "devid-agent $version" ] || fail "devid-agent --version: $(devid-agent --version)"
venv=$(readlink /opt/devid-agent/venv)
[ -x "/opt/devid-agent/$venv/bin/python" ] || fail "no venv behind /opt/devid-agent/venv"
getent passwd devid-agent | grep -q ':/var/lib/devid-agent:/usr/sbin/nologin$' || fail "service user"
id -nG devid-agent | grep -qw tss || fail "devid-agent is not in group tss"
[ "$(stat -c '%a %U %G' /etc/devid-agent/config.toml)" = "640 root devid-agent" ] ||
  fail "config.toml is $(stat -c '%a %U %G' /etc/devid-agent/config.toml)"
[ "$(stat -c '%a %U' /var/lib/devid-agent)" = "700 devid-agent" ] || fail "/var/lib/devid-agent"
[ "$(stat -c '%a %U' /var/lib/devid-agent-firmware/private)" = "700 root" ] || fail "firmware state"
echo "deb-check: $(devid-agent --version), venv /opt/devid-agent/$venv, user devid-agent in tss, config 0640 root:devid-agent"

out=$(devid-agent config check) || fail "config check as root exited $?"
[ "$out" = OK ] || fail "config check as root: $out"
out=$(runuser -u devid-agent -- devid-agent config check) || fail "config check as devid-agent exited $?"
[ "$out" = OK ] || fail "config check as devid-agent: $out"
echo "deb-check: devid-agent config check on the shipped config: OK (as root and as devid-agent)"

# as the service user, as an operator runs it (`sudo -u devid-agent devid-agent doctor`): root
# is told that the state directory is not its own
rc=0
runuser -u devid-agent -- devid-agent doctor --json > /tmp/doctor.json 2>/tmp/doctor.err || rc=$?
[ "$rc" -le 1 ] || fail "doctor --json exited $rc: $(cat /tmp/doctor.err)"
python3 - "$rc" <<'PY' || fail "doctor --json: unexpected output: $(head -c 2000 /tmp/doctor.json)"
import json, sys
rc = int(sys.argv[1])
findings = json.load(open("/tmp/doctor.json"))
assert isinstance(findings, list) and findings, findings
for f in findings:
    assert set(f) == {"check", "status", "detail"}, f
    assert f["status"] in {"ok", "warning", "error", "fatal"}, f
by = {f["check"]: f for f in findings}
assert by["config"]["status"] == "ok", by["config"]
assert by["state_dir"]["status"] == "ok", by["state_dir"]
# the provider is the bundled one (it needs a TPM to load: below, with swtpm)
assert "/opt/devid-agent/lib/ossl-modules/tpm2.so" in by["tls_provider"]["detail"], by["tls_provider"]
# expected on a root without a TPM and with est.url unset: errors, hence exit 1
assert by["est_config"]["status"] == "error", by["est_config"]
assert by["key_store"]["status"] == "error", by["key_store"]
assert rc == 1
summary = {}
for f in findings:
    summary[f["status"]] = summary.get(f["status"], 0) + 1
print("deb-check: doctor --json: %d checks %s; exit %d (expected: no TPM, est.url unset)"
      % (len(findings), summary, rc))
for f in findings:
    if f["status"] != "ok" or f["check"] == "tls_provider":
        print("deb-check:   %-16s %-7s %s" % (f["check"], f["status"], f["detail"][:200]))
PY
phase "config check, doctor (no TPM)"

# With a TPM (swtpm, installed here for the check only): tpm2-pytss from the bundled wheel and
# the bundled provider 1.3.0 both work on Debian 12, whose own provider is 1.1.1.
apt-get install -y -qq --no-install-recommends swtpm > /tmp/swtpm-install.log 2>&1 ||
  { tail /tmp/swtpm-install.log; fail "installing swtpm"; }
mkdir -p /tmp/swtpm-state
# A free pair (port, port + 1), both bound at once to check; the host's network is shared, so
# another process may still take one before swtpm does: then swtpm exits and we try another.
free_pair() {
  python3 - <<'PY'
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); port = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", port + 1))
    except OSError:
        a.close(); b.close(); continue
    print(port); break
PY
}
swtpm_pid=
trap '[ -z "$swtpm_pid" ] || kill "$swtpm_pid" 2>/dev/null || true' EXIT
for attempt in 1 2 3 4 5; do
  port=$(free_pair)
  swtpm socket --tpm2 --server type=tcp,port=$port,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 --tpmstate dir=/tmp/swtpm-state \
    --flags not-need-init,startup-clear &
  swtpm_pid=$!
  # listening, and by this swtpm (still alive), not by whoever else holds the port
  if python3 - "$port" "$swtpm_pid" <<'PY'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
for _ in range(500):
    if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
        sys.exit(1)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.01)
sys.exit(1)
PY
  then break; fi
  kill "$swtpm_pid" 2>/dev/null || true; wait "$swtpm_pid" 2>/dev/null || true; swtpm_pid=
  [ "$attempt" -lt 5 ] || fail "swtpm did not listen (5 port pairs tried)"
done
sed "s|^tcti = .*|tcti = \"swtpm:host=127.0.0.1,port=$port\"|" /etc/devid-agent/config.toml > /tmp/swtpm.toml
chmod 0644 /tmp/swtpm.toml
rc=0
runuser -u devid-agent -- devid-agent --config /tmp/swtpm.toml doctor --json > /tmp/doctor-tpm.json || rc=$?
kill "$swtpm_pid"; wait "$swtpm_pid" 2>/dev/null || true
python3 - <<'PY' || fail "doctor --json with swtpm (exit $rc): $(head -c 3000 /tmp/doctor-tpm.json)"
import json
by = {f["check"]: f for f in json.load(open("/tmp/doctor-tpm.json"))}
for name in ("key_store", "tls_provider"):
    assert by[name]["status"] == "ok", by[name]
    print("deb-check:   %-16s %-7s %s" % (name, "ok", by[name]["detail"]))
import re
m = re.search(r"provider (\d+)\.(\d+)", by["tls_provider"]["detail"])
assert m and (int(m[1]), int(m[2])) >= (1, 2), by["tls_provider"]
PY
phase "doctor with a software TPM: TPM and bundled provider ok"

out=$(systemd-analyze verify /lib/systemd/system/devid-agent.service \
  /lib/systemd/system/devid-agent-enroll.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify said: $out"
! systemctl is-enabled devid-agent.service >/dev/null 2>&1 || fail "the service was enabled by the install"
echo "deb-check: systemd-analyze verify of both installed units: clean; units not enabled"
phase "checks"

# The upgrade path: the same package again runs prerm upgrade and postinst configure.
echo state > /var/lib/devid-agent/marker
dpkg -i /tmp/devid-agent_*.deb > /tmp/reinstall.log 2>&1 || { tail /tmp/reinstall.log; fail "reinstall"; }
[ "$(ls -d /opt/devid-agent/venv.* | wc -l)" = 1 ] || fail "old venvs left: $(ls -d /opt/devid-agent/venv.*)"
[ "$(readlink /opt/devid-agent/venv)" != "$venv" ] || fail "the venv was not rebuilt"
devid-agent --version > /dev/null || fail "devid-agent after reinstall"
phase "reinstalled (upgrade path): venv rebuilt and swapped, old one removed"

apt-get remove -y -qq devid-agent > /tmp/remove.log 2>&1 || { tail /tmp/remove.log; fail "remove"; }
[ ! -e /opt/devid-agent ] || fail "/opt/devid-agent left after remove: $(ls -A /opt/devid-agent)"
[ ! -e /usr/bin/devid-agent ] || fail "/usr/bin/devid-agent left after remove"
[ -f /var/lib/devid-agent/marker ] || fail "remove deleted the state"
[ -f /etc/devid-agent/config.toml ] || fail "remove deleted the config"
phase "removed: /opt/devid-agent gone, state and config kept"

apt-get purge -y -qq devid-agent > /tmp/purge.log 2>&1 || { tail /tmp/purge.log; fail "purge"; }
for p in /var/lib/devid-agent /var/lib/devid-agent-firmware /etc/devid-agent /opt/devid-agent; do
  [ ! -e "$p" ] || fail "$p left after purge"
done
phase "purged: state, config and /opt/devid-agent gone (the system user stays, as Debian does)"
CHECK

# A private mount namespace: /proc and /dev exist inside it only and vanish with it. The .debs
# apt downloads are kept in .deps/deb-check/archives for the next run (the root stays fresh:
# only the download is saved).
mkdir -p .deps/deb-check/archives/partial
unshare --mount --fork -- /bin/sh -c '
  mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" &&
  mount --bind "$3" "$1/var/cache/apt/archives" &&
  exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
    chroot "$1" /bin/bash /tmp/check.sh "$2"' _ "$root" "$version" "$PWD/.deps/deb-check/archives" || die "the check in the fresh root failed"
echo "deb-check: $deb ($(du -k "$deb" | cut -f1) KiB) passed on a fresh Debian $suite in $(elapsed "$t0") s"
