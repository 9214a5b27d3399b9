"""How a run is steered: control requests, pausing, stopping, signals and health actions.

A mixin of :class:`tbhealth.Monitor` (it uses the monitor's progress, run directory, control
channel and checkpoint function), kept apart because it is the part with the rules that users
rely on: a request is applied at a step boundary and acknowledged exactly once; a stop writes a
checkpoint first; under DDP every rank applies the same request at the same step (rank 0 reads
the requests, everyone agrees over the Gloo group every ``CONTROL_SYNC_EVERY`` steps).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tbhealth.run.rundir import ControlRequest


class Steering:
    def _local_control(self, force: bool = False) -> None:
        requests = self._control.poll(force=force) if self._control is not None else []
        if requests:
            self._apply_requests(requests)
        if self._pending_actions:
            self._run_pending_actions(self._take_actions())
        if self._stop_wanted and not self._stop_reason:
            self._begin_stop(self._stop_wanted)

    def _sync_control(self) -> None:
        """Under DDP: rank 0's requests, every rank's signals and health actions, agreed by all.

        Every rank calls this at the same steps, so each request is applied at the same step
        everywhere; rank 0 alone acknowledges and writes the checkpoint.
        """
        mine = {"signal": self._stop_wanted, "actions": self._take_actions(), "requests": []}
        if self._control is not None:
            mine["requests"] = [(r.id, r.command, r.source, r.time, r.error) for r in self._control.poll()]
        everyone = self.dist.all_gather(mine)
        requests = [ControlRequest(*r) for r in everyone[0]["requests"]]
        if requests:
            self._apply_requests(requests)
        agreed = [a for e in everyone for a in e["actions"]]
        if agreed:
            self._run_pending_actions(agreed)
        wanted = next((e["signal"] for e in everyone if e["signal"]), None)
        if wanted and not self._stop_reason:
            self._begin_stop(wanted)

    def _apply_requests(self, requests: list) -> None:
        for req in requests:
            ok, detail, extra = (False, req.error, {}) if req.error else self._apply(req.command)
            if self._control is None:  # another rank: rank 0 acknowledges and logs
                continue
            self._control.ack(req, ok, detail, **extra)
            self.log("INFO" if ok else "WARNING", f"control {req.command or '?'} ({req.source or 'unknown'}): {detail}")
            if self.writer:
                self.writer.text(self.progress.global_step, "control", f"**{req.command}** → {'done' if ok else 'rejected'}: {detail}")

    def _apply(self, command: str) -> tuple[bool, str, dict]:
        p = self.progress
        if self._stop_reason:
            return False, "the run is already stopping", {}
        if command == "pause":
            if self._paused:
                return False, "already paused", {}
            self._set_paused(True)
            return True, f"paused at epoch {p.epoch}, step {p.global_step}", {"step": p.global_step}
        if command == "resume":
            if not self._paused:
                return False, "not paused", {}
            self._set_paused(False)
            return True, f"resumed at epoch {p.epoch}, step {p.global_step}", {"step": p.global_step}
        if command == "checkpoint":
            try:
                path = self._checkpoint("manual")
            except Exception as e:  # a full disk must not end the run, and the request gets its answer
                self.log("ERROR", f"checkpoint failed: {type(e).__name__}: {e}")
                return False, f"checkpoint failed: {type(e).__name__}: {e}", {}
            if path is None:
                return False, "this training loop registered no checkpoint function", {}
            return True, f"checkpoint written: {path}", {"checkpoint": path.name, "path": str(path), "step": p.global_step}
        if command == "stop":
            path = self._begin_stop("stop requested")
            where = f"; checkpoint {path}" if path else ""
            return True, f"stopping at epoch {p.epoch}, step {p.global_step}{where}", (
                {"checkpoint": path.name, "path": str(path), "step": p.global_step} if path else {"step": p.global_step})
        return False, f"unknown command {command!r}", {}

    def _checkpoint(self, kind: str) -> Path | None:
        if self.checkpoint_fn is None:
            return None
        path = Path(self.checkpoint_fn(kind))
        self.progress.interventions["checkpoints"] += kind == "manual"
        return path

    def _begin_stop(self, reason: str) -> Path | None:
        """Stop at this step boundary: checkpoint, then ``should_stop`` tells the loop to leave."""
        if self._stop_reason:
            return None
        p = self.progress
        if self._paused:
            self._set_paused(False)
        p.state = "stopping"
        self._poke()
        try:
            path = self._checkpoint("stop")
        except Exception as e:  # stop all the same: the last epoch's checkpoint is still on disk
            path = None
            self.log("ERROR", f"checkpoint at stop failed: {type(e).__name__}: {e}")
        self._stop_reason = reason
        p.interventions["stops"] += 1
        if self.is_writer:
            self.log("WARNING", f"stopping: {reason}" + (f"; checkpoint {path}" if path else ""))
        return path

    def _set_paused(self, paused: bool) -> None:
        p = self.progress
        now = time.monotonic()
        if paused:
            p.paused_since = now
            p.interventions["pauses"] += 1
        elif p.paused_since is not None:
            p.paused_s += now - p.paused_since
            p.epoch_paused_s += now - p.paused_since
            p.paused_since = None
            p.interventions["resumes"] += 1
        self._paused = paused
        p.state = "paused" if paused else "training"
        self._poke()

    def _wait_paused(self) -> None:
        time.sleep(0.05)
        if self.dist is None:
            self._local_control()
        else:
            self._sync_control()

    def _take_actions(self) -> list[tuple[str, str]]:
        """Health actions queued so far (the heartbeat thread may queue more meanwhile)."""
        with self._actions_lock:
            actions, self._pending_actions = self._pending_actions, []
        return actions

    def _run_pending_actions(self, actions: list[tuple[str, str]]) -> None:
        for action, rule in actions:
            if action == "stop":
                self._begin_stop(f"health rule {rule}: action stop")
            elif action == "pause" and not self._paused and not self._stop_reason:
                self._set_paused(True)
                if self.is_writer:
                    self.log("WARNING", f"paused by health rule {rule}; resume with `tbhealth resume {self.run_dir}`")

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stop_wanted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_wanted = f"received {name}"
