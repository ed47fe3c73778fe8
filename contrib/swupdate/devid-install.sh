#!/bin/sh
# SWUpdate shellscript: called with "preinst" before and "postinst" after the files are copied.
set -eu
# Only root can create entries in /run, so no other user can have made this directory first (a
# directory under /var/tmp or /tmp could be anyone's, and the bundle would be theirs to swap).
DIR=/run/devid-install
BUNDLE=$DIR/rootfs.fw

case "${1:-}" in
preinst)
    rm -rf "$DIR"
    mkdir -m 0700 "$DIR"
    ;;
postinst)
    status=0
    devid-agent firmware install "$BUNDLE" || status=$?
    rm -rf "$DIR"
    case "$status" in
    0) ;;
    65) echo "devid-agent refused the bundle" >&2 ;;
    74) echo "devid-agent could not write the slot or boot env" >&2 ;;
    *) echo "devid-agent failed with status $status" >&2 ;;
    esac
    exit "$status"
    ;;
esac
