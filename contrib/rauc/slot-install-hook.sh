#!/bin/sh
# RAUC slot install hook: let devid-agent verify and write the image.
#
# In the RAUC bundle's manifest.raucm:
#   [hooks]
#   filename=slot-install-hook.sh
#   [image.rootfs]
#   filename=rootfs.fw          # a devid-agent bundle (devid-agent firmware sign ... -o rootfs.fw)
#   hooks=install
#
# RAUC has chosen the target slot; devid-agent refuses it if it is the booted one, verifies
# the signer chain, compatible string and security version, streams the payload into the slot,
# reads it back, and makes it the next boot (RAUC's BOOT_ORDER/BOOT_x_LEFT or GRUB variables).
# Keep RAUC's own bundle signature too: the two checks are independent.
set -eu

case "$1" in
slot-install)
    # RAUC_SLOT_BOOTNAME is "A" or "B" (bootname= in system.conf); RAUC_IMAGE_NAME is the
    # image file inside the mounted bundle.
    exec devid-agent firmware install --slot "$RAUC_SLOT_BOOTNAME" "$RAUC_IMAGE_NAME"
    ;;
*)
    exit 1
    ;;
esac
