"""The trainer's side of the control channel: notice requests cheaply, hand them over in order.

Cost model: the training thread calls :meth:`ControlChannel.poll` after every step. Most calls
return after one ``time.monotonic()``; at most every ``interval`` seconds it does one ``lstat``
of ``control.jsonl``, and only when the file changed does it read the new bytes. Each request is
handed over exactly once however many arrive between two polls, and acknowledged exactly once
(by whoever applies it).

``control.jsonl`` is written by other processes (the CLI, the Health tab, any tool), so the
channel trusts nothing about it: a line that is not a valid request comes back with ``error`` set
(the caller rejects it with an acknowledgement and training goes on); a file truncated or replaced
under the read offset is read again from the start (:class:`tbhealth.run.tail.Follower`), and
requests already handed over are recognised by their ids and not handed over twice; a file that
must not be read (a symlink, a FIFO) is ignored until it changes.
"""

from __future__ import annotations

import time

from tbhealth.run.rundir import ControlRequest, RunDir

#: Request ids remembered to drop repeats after the file is read again from the start; a run
#: that receives more requests than this forgets the oldest (which are long acknowledged).
REMEMBERED_IDS = 100_000


class ControlChannel:
    def __init__(self, run: RunDir, interval: float = 0.1):
        self.run = run
        self.interval = interval
        self._follower = run.follow_control()
        self._seen: dict[str, None] = {}  # an insertion-ordered set
        self._next_poll = 0.0

    def reject_stale(self) -> int:
        """Acknowledge requests left from before this process started as rejected.

        A request written while no trainer was live (or to a previous incarnation of a resumed
        run) must not linger unanswered, and must not be acted on long after it was sent.
        """
        try:
            acked = self.run.read_acks()
        except OSError:  # not a plain file: answer everything again rather than fail the start
            acked = {}
        self._remember(acked)
        stale = self._read_new()
        for r in stale:
            self.run.acknowledge(r.id, "rejected", "the run was not live when this request was sent")
        return len(stale)

    def poll(self, now: float | None = None, force: bool = False) -> list[ControlRequest]:
        """New requests since the last poll, oldest first; [] when not yet time to look."""
        now = time.monotonic() if now is None else now
        if now < self._next_poll and not force:
            return []
        self._next_poll = now + self.interval
        if not self._follower.changed():
            return []
        return self._read_new()

    def ack(self, request: ControlRequest, ok: bool, detail: str, **extra) -> None:
        self.run.acknowledge(request.id, "done" if ok else "rejected", detail, command=request.command, **extra)

    def _read_new(self) -> list[ControlRequest]:
        try:
            pairs = self._follower.read()
        except OSError:  # a symlink, a FIFO, no permission: nothing to obey until it is a plain file
            return []
        fresh = []
        for request in self.run.parse_control(pairs):
            if request.id not in self._seen:  # a repeated line, or one read again after a truncation
                self._seen[request.id] = None
                fresh.append(request)
        self._remember(())
        return fresh

    def _remember(self, ids) -> None:
        for rid in ids:
            self._seen[rid] = None
        while len(self._seen) > REMEMBERED_IDS:
            del self._seen[next(iter(self._seen))]
