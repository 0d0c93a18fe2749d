"""The states of catalog rows, by name: importable without SQLAlchemy (the quick CLI reads use them)."""

from __future__ import annotations

# A forwarding job: waiting to be sent, being sent by one node, delivered, given up on.
PENDING, CLAIMED, DONE, DEAD = "pending", "claimed", "done", "dead"
JOB_STATES = (PENDING, CLAIMED, DONE, DEAD)

# A client's storage commitment request: its N-EVENT-REPORT has not gone out yet, or has.
WAITING, REPORTED = "waiting", "reported"
COMMITMENT_STATES = (WAITING, REPORTED)
