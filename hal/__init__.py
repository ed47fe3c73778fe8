"""Hardware abstraction: TPM, bootloader environments, slots and atomic storage."""
