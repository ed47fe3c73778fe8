"""The local control socket (`paths.run_dir`/control.sock; docs/control.md).

`protocol` (pure): versioned JSON lines, bounded. `permission` (pure): who may ask what, from the
peer's SO_PEERCRED credentials. `server` (I/O): the daemon's component that serves the socket.
`client` (standard library only): what `status` and `renew` use to ask the running service, so
`status` against a running daemon starts fast. This package imports nothing itself.
"""
