"""Names of what lives under `paths.state_dir`, in one light module: the commands that only read
state (`status`) find the files without importing the code that writes them."""

from __future__ import annotations

#: a 202'd EST request kept across restarts (agent.est.pending)
PENDING_FILE_NAME = "est-pending.json"
EST_ANCHOR_FILE_NAME = "est-anchor.pem"  # the anchor a fingerprint bootstrap stored
