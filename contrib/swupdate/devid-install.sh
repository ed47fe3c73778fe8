#!/bin/sh
# SWUpdate shellscript: called with "preinst" before and "postinst" after the files are copied.
set -eu
BUNDLE=/var/tmp/devid/rootfs.fw

case "${1:-}" in
preinst)
    mkdir -p /var/tmp/devid
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
