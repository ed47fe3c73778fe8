"""The device channel: MQTT over mutual TLS with the current identity (docs/mqtt.md).

Pure parts: `topics` (names), `messages` (versioned JSON payloads), `backoff` (reconnect
delays with full jitter, broker failover), `queue` (the bounded offline event queue),
`rejection` (what a broker's refusal means and what to do about it), `commands` (the seam to
the signed-command verifier). I/O: `channel`, the paho adapter, a daemon Component.
"""
