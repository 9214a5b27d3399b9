"""The trainer's side of the control channel: notice requests cheaply, hand them over in order.

Cost model: the training thread calls :meth:`ControlChannel.poll` after every step. Most calls
return after one ``time.monotonic()``; at most every ``interval`` seconds it does one ``stat``
of ``control.jsonl``, and only when the file grew does it read the new bytes. Requests are read
by byte offset, so each line is seen exactly once however many arrive between two polls, and
each is acknowledged exactly once (by whoever applies it).
"""

from __future__ import annotations

import time

from tbhealth.run.rundir import ControlRequest, RunDir


class ControlChannel:
    def __init__(self, run: RunDir, interval: float = 0.1):
        self.run = run
        self.interval = interval
        self._offset = 0
        self._size = 0
        self._next_poll = 0.0

    def reject_stale(self) -> int:
        """Acknowledge requests left from before this process started as rejected.

        A request written while no trainer was live (or to a previous incarnation of a resumed
        run) must not linger unanswered, and must not be acted on long after it was sent.
        """
        requests, self._offset = self.run.read_control(0)
        self._size = self._offset
        acked = self.run.read_acks()
        stale = [r for r in requests if r.id not in acked]
        for r in stale:
            self.run.acknowledge(r.id, "rejected", "the run was not live when this request was sent")
        return len(stale)

    def poll(self, now: float | None = None, force: bool = False) -> list[ControlRequest]:
        """New requests since the last poll, oldest first; [] when not yet time to look."""
        now = time.monotonic() if now is None else now
        if now < self._next_poll and not force:
            return []
        self._next_poll = now + self.interval
        size = self.run.control_size()
        if size <= self._size:
            return []
        requests, self._offset = self.run.read_control(self._offset)
        self._size = self._offset
        return requests

    def ack(self, request: ControlRequest, ok: bool, detail: str, **extra) -> None:
        self.run.acknowledge(request.id, "done" if ok else "rejected", detail, command=request.command, **extra)
