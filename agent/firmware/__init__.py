"""Signed firmware bundles, A/B slots, commit and rollback."""
