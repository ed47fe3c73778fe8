"""Bootloader environments: U-Boot, GRUB, a plain file."""
