#!/bin/sh
# SWUpdate shellscript: called with "preinst" before and "postinst" after the files are copied.
set -eu
# Inside root's own firmware tree (root 0755 above, this directory root 0700), never a shared
# directory such as /var/tmp where any user could create the directory first and swap the file.
PARENT=${DEVID_AGENT_FIRMWARE_DIR:-/var/lib/devid-agent-firmware}
INCOMING=$PARENT/incoming
BUNDLE=$INCOMING/rootfs.fw

case "${1:-}" in
preinst)
    umask 077
    mkdir -p -m 0755 "$PARENT"
    owner=$(stat -c %u "$PARENT")
    if [ -L "$PARENT" ] || [ "$owner" != 0 ]; then
        echo "refusing $PARENT: not a root-owned directory" >&2
        exit 1
    fi
    rm -rf "$INCOMING"        # fresh each time: nothing left by an earlier run is trusted
    mkdir -m 0700 "$INCOMING"
    ;;
postinst)
    status=0
    devid-agent firmware install "$BUNDLE" || status=$?
    rm -f "$BUNDLE"
    case "$status" in
    0) ;;
    65) echo "devid-agent refused the bundle" >&2 ;;
    74) echo "devid-agent could not write the slot or boot env" >&2 ;;
    *) echo "devid-agent failed with status $status" >&2 ;;
    esac
    exit "$status"
    ;;
esac
