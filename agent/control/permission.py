"""Who may ask the control socket what. Pure.

The peer is who the kernel says connected (SO_PEERCRED: pid, uid, gid; the supplementary groups
from SO_PEERGROUPS, or the `Groups:` line of /proc/<pid>/status). Read-only requests (status,
ping) are for root, the service user and members of `control.readers_group` (primary or
supplementary); requests that act (renew, reload, reconnect) for root and the service user only.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.control.protocol import ACTING, READ_ONLY

__all__ = ["Peer", "Policy", "groups_from_proc_status", "refusal"]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Policy:
    #: the uid the service runs as
    service_uid: int
    #: the gid of control.readers_group, None when unset
    readers_gid: int | None = None


def refusal(policy: Policy, peer: Peer, op: str) -> str | None:
    """None when `peer` may make request `op`, else why not (one line, for the peer and audit)."""
    if peer.uid in (0, policy.service_uid):
        return None
    if op in ACTING:
        return f"uid {peer.uid} may not {op}: only root and the service user may"
    if op in READ_ONLY:
        gid = policy.readers_gid
        if gid is not None and (peer.gid == gid or gid in peer.groups):
            return None
        return (
            f"uid {peer.uid} may not ask {op}: only root, the service user and members of "
            "control.readers_group may"
        )
    return f"unknown op {op!r}"


def groups_from_proc_status(text: str) -> frozenset[int]:
    """The supplementary groups on the `Groups:` line of /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith("Groups:"):
            try:
                return frozenset(int(g) for g in line.split(":", 1)[1].split())
            except ValueError:
                return frozenset()
    return frozenset()
