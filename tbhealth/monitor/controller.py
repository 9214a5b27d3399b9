"""How a run is steered: control requests, pausing, stopping, signals and health actions.

The rules users rely on live here: a request is applied at a step boundary and acknowledged
exactly once; a stop writes a checkpoint first; the first Ctrl-C, SIGTERM or SIGHUP is a stop,
a second Ctrl-C aborts; a health rule's ``pause``/``stop`` action, found on any thread, is
applied by the training thread at its next boundary. Under DDP every rank applies the same request at the same
step: rank 0 reads the requests (only it has a control channel) and the ranks agree over the
Gloo group every ``CONTROL_SYNC_EVERY`` steps.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from tbhealth.distributed import CONTROL_SYNC_EVERY, DistContext
from tbhealth.monitor.checkpoints import Written
from tbhealth.monitor.control import ControlChannel
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.sinks import RunLog, Sink
from tbhealth.run.rundir import ControlRequest
from tbhealth.run.states import State

#: How often a paused run looks for a resume (seconds).
PAUSE_POLL_S = 0.05
#: Signals that stop a run gracefully (with a checkpoint): Ctrl-C, ``kill``, a closed terminal.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: Said after the signal's name in the stop message, where the name alone does not explain it.
SIGNAL_WHY = {getattr(signal, "SIGHUP", None): " (the terminal was closed)"}


class StepInterrupted(KeyboardInterrupt):
    """Raised inside a hung step to end the run (``stalled`` with ``action: stop``); the
    Monitor's ``with`` block ends the run ``stopped`` and lets the loop's code after it run."""


class Controller:
    """Applies control requests, signals and health actions to one run's progress.

    Args:
        progress: the run's progress (state, interventions, paused time are recorded there).
        log, sink: where decisions are logged and shown (TensorBoard text).
        channel: the control file, on rank 0; ``None`` on the other ranks.
        dist: under torch.distributed, the group the ranks agree over.
        save: ``save(kind) -> Path | Future[Path] | None`` writes a checkpoint (``manual`` or
            ``stop``); a future is a write in flight, acknowledged when it is done; None: the
            loop registered no way to checkpoint.
        poke: asks for a status write now (a state changed).
        run_path: the run, named in the hint of a health rule's pause.
    """

    def __init__(self, progress: Progress, *, log: RunLog, sink: Sink, channel: ControlChannel | None,
                 dist: DistContext | None, save: Callable[[str], Written | None], poke: Callable[[], None],
                 run_path: Path):
        self._p, self._log, self._sink, self._channel = progress, log, sink, channel
        self._dist, self._save, self._poke, self._run_path = dist, save, poke, run_path
        self.paused = False
        self.stop_reason: str | None = None
        self._stop_wanted: str | None = None  # a stop asked for by a signal or request_stop()
        self._actions: list[tuple[str, str]] = []
        self._actions_lock = threading.Lock()  # the watchdog thread queues actions too
        self._old_handlers: dict = {}
        self._chain = False  # also call the handler installed before ours
        self._in_flight: list[tuple[ControlRequest, Future, int]] = []  # checkpoint requests being written
        self._interrupt: str | None = None  # why the next SIGINT is a hung step's interruption

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    # ------------------------------------------------------------------ the training thread

    def after_step(self, step: int) -> None:
        """The boundary after optimizer step ``step``: apply what arrived; wait while paused."""
        if self._dist is None:
            self._local()
        elif step % CONTROL_SYNC_EVERY == 0:
            self._agreed()
        self._wait_while_paused()

    def between_epochs(self) -> None:
        """Apply what arrived during validation and checkpointing now, not one step into the
        next epoch. Under DDP the ranks agree only at step multiples, so nothing happens here."""
        if self._dist is None:
            self._local(force=True)
            self._wait_while_paused()

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary, with a checkpoint."""
        self._stop_wanted = self._stop_wanted or reason

    def end(self, state: str | None = None, message: str | None = None) -> None:
        """The loop ended: ``stopped`` if a stop was applied (a stop counts once), else
        ``completed``, unless the caller knows better (``state``, ``message``)."""
        self._settle(wait=True)  # every request gets its answer before the run ends
        p = self._p
        p.state = state or (State.STOPPED.value if self.stop_reason else State.COMPLETED.value)
        p.message = message or self.stop_reason
        if p.state == State.STOPPED.value and p.interventions["stops"] == 0:
            p.interventions["stops"] += 1

    # ------------------------------------------------------------------ any thread

    def queue_action(self, action: str, rule: str) -> None:
        """A health rule's ``pause`` or ``stop``, for the training thread's next boundary."""
        with self._actions_lock:
            self._actions.append((action, rule))

    def interrupt(self, reason: str, thread: int | None) -> bool:
        """End a run whose step hangs (the watchdog's thread calls this): the boundary where a stop
        applies never comes, so the hung step itself is interrupted by a SIGINT to the training
        thread, which our handler turns into :class:`StepInterrupted` (no checkpoint: the step is
        cut in half). Python runs signal handlers on the main thread only, and a wait inside C code
        that never returns to Python cannot be cut: then the stop waits for the step to return.
        Returns whether the training thread was signalled."""
        self.request_stop(reason)
        self._p.state, self._p.message = State.STOPPING.value, reason
        self._poke()
        main = threading.main_thread().ident
        if thread != main or signal.SIGINT not in self._old_handlers:
            self._log.write("WARNING", f"{reason}: the training thread is not the main thread (or signal handling "
                            "is off), so the hung step cannot be interrupted; the run stops if it returns")
            return False
        self._interrupt = reason
        self._log.write("WARNING", f"{reason}: interrupting the hung step; no checkpoint is written")
        signal.pthread_kill(main, signal.SIGINT)
        return True

    # ------------------------------------------------------------------ signals

    def install_signals(self, chain: bool = False) -> None:
        """SIGINT, SIGTERM and SIGHUP (a closed terminal) stop gracefully; a second SIGINT aborts.

        Python allows handlers on the main thread only. A SIGHUP that was ignored (``nohup``)
        stays ignored. ``chain``: after deciding, also call the handler that was there before
        (a framework's own, e.g. Lightning's SIGTERM handler), except Python's default SIGINT
        handler, which would turn the first Ctrl-C into an abort.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self._chain = chain
        for sig in STOP_SIGNALS:
            if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        if self._interrupt and signum == signal.SIGINT:
            reason, self._interrupt = self._interrupt, None
            raise StepInterrupted(f"{reason}; the hung step was interrupted, no checkpoint written")
        if self._stop_wanted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_wanted = f"received {signal.Signals(signum).name}" + SIGNAL_WHY.get(signum, "")
        previous = self._old_handlers.get(signum)
        if self._chain and callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    # ------------------------------------------------------------------ internals

    def _local(self, force: bool = False) -> None:
        self._settle()
        requests = self._channel.poll(force=force) if self._channel is not None else []
        if requests:
            self._apply_requests(requests)
        if self._actions:
            self._run_actions(self._take_actions())
        if self._stop_wanted and not self.stop_reason:
            self._begin_stop(self._stop_wanted)

    def _agreed(self) -> None:
        """Under DDP: rank 0's requests, every rank's signals and health actions, agreed by all.

        Every rank calls this at the same steps, so each request is applied at the same step
        everywhere; rank 0 alone acknowledges and writes the checkpoint.
        """
        mine = {"signal": self._stop_wanted, "actions": self._take_actions(), "requests": []}
        self._settle()
        if self._channel is not None:
            mine["requests"] = [(r.id, r.command, r.source, r.time, r.error) for r in self._channel.poll()]
        everyone = self._dist.all_gather(mine)
        requests = [ControlRequest(*r) for r in everyone[0]["requests"]]
        if requests:
            self._apply_requests(requests)
        agreed = [a for e in everyone for a in e["actions"]]
        if agreed:
            self._run_actions(agreed)
        wanted = next((e["signal"] for e in everyone if e["signal"]), None)
        if wanted and not self.stop_reason:
            self._begin_stop(wanted)

    def _wait_while_paused(self) -> None:
        while self.paused and not self.stop_reason:
            time.sleep(PAUSE_POLL_S)
            if self._dist is None:
                self._local()
            else:
                self._agreed()

    def _apply_requests(self, requests: list[ControlRequest]) -> None:
        for req in requests:
            ok, detail, extra = (False, req.error, {}) if req.error else self._apply(req.command)
            if self._channel is None:  # another rank: rank 0 acknowledges and logs
                continue
            if isinstance(extra, Future):  # a checkpoint being written: answered once it is on disk
                self._in_flight.append((req, extra, self._p.global_step))
                continue
            self._answer(req, ok, detail, extra)

    def _answer(self, req: ControlRequest, ok: bool, detail: str, extra: dict) -> None:
        self._channel.ack(req, ok, detail, **extra)
        self._log.write("INFO" if ok else "WARNING", f"control {req.command or '?'} ({req.source or 'unknown'}): {detail}")
        self._sink.text(self._p.global_step, "control", f"**{req.command}** → {'done' if ok else 'rejected'}: {detail}")

    def _settle(self, wait: bool = False) -> None:
        """Answer the checkpoint requests whose write has finished (all of them when ``wait``)."""
        if not self._in_flight:
            return
        pending = []
        for req, future, step in self._in_flight:
            if not (wait or future.done()):
                pending.append((req, future, step))
                continue
            try:
                path = Path(future.result())
            except Exception as e:  # noqa: BLE001 - the request gets its answer, the run goes on
                self._log.write("ERROR", f"checkpoint failed: {type(e).__name__}: {e}")
                self._answer(req, False, f"checkpoint failed: {type(e).__name__}: {e}", {})
                continue
            self._p.interventions["checkpoints"] += 1
            self._answer(req, True, f"checkpoint written: {path}", _written(path, step))
        self._in_flight = pending

    def _apply(self, command: str) -> tuple[bool, str, dict]:
        p = self._p
        if self.stop_reason:
            return False, "the run is already stopping", {}
        if command in ("pause", "resume"):
            return self._pause_or_resume(command == "pause")
        if command == "checkpoint":
            try:
                path = self._checkpoint("manual")
            except Exception as e:  # a full disk must not end the run, and the request gets its answer
                self._log.write("ERROR", f"checkpoint failed: {type(e).__name__}: {e}")
                return False, f"checkpoint failed: {type(e).__name__}: {e}", {}
            if path is None:
                return False, "this training loop registered no checkpoint function", {}
            if isinstance(path, Future):
                return True, "", path  # answered by _settle once written
            self._p.interventions["checkpoints"] += 1
            return True, f"checkpoint written: {path}", _written(path, p.global_step)
        if command == "stop":
            path = self._begin_stop("stop requested")
            where = f"; checkpoint {path}" if path else ""
            return True, f"stopping at epoch {p.epoch}, step {p.global_step}{where}", _written(path, p.global_step)
        return False, f"unknown command {command!r}", {}

    def _pause_or_resume(self, pause: bool) -> tuple[bool, str, dict]:
        p = self._p
        if self.paused == pause:
            return False, "already paused" if pause else "not paused", {}
        self._set_paused(pause)
        return True, f"{'paused' if pause else 'resumed'} at epoch {p.epoch}, step {p.global_step}", {"step": p.global_step}

    def _checkpoint(self, kind: str) -> Written | None:
        return self._save(kind)

    def _begin_stop(self, reason: str) -> Path | None:
        """Stop at this step boundary: checkpoint, then ``should_stop`` tells the loop to leave."""
        if self.stop_reason:
            return None
        p = self._p
        if self.paused:
            self._set_paused(False)
        p.state = State.STOPPING.value
        p.interventions["stops"] += 1  # before the checkpoint: the state it stores counts this stop
        self._poke()
        try:
            path = self._checkpoint("stop")
            if isinstance(path, Future):  # the loop leaves only once the stop's checkpoint is on disk
                path = Path(path.result())
        except Exception as e:  # stop all the same: the last epoch's checkpoint is still on disk
            path = None
            self._log.write("ERROR", f"checkpoint at stop failed: {type(e).__name__}: {e}")
        self.stop_reason = reason
        where = f"; checkpoint {path}" if path else ""
        self._log.once("WARNING", f"stopping: {reason}{where}" + (f"; {p.resume_hint}" if p.resume_hint else ""))
        return path

    def _set_paused(self, paused: bool) -> None:
        p = self._p
        now = time.monotonic()
        if paused:
            p.paused_since = now
            p.interventions["pauses"] += 1
        elif p.paused_since is not None:
            p.paused_s += now - p.paused_since
            p.epoch_paused_s += now - p.paused_since
            p.paused_since = None
            p.interventions["resumes"] += 1
        self.paused = paused
        p.state = State.PAUSED.value if paused else State.TRAINING.value
        self._poke()

    def _take_actions(self) -> list[tuple[str, str]]:
        with self._actions_lock:
            actions, self._actions = self._actions, []
        return actions

    def _run_actions(self, actions: list[tuple[str, str]]) -> None:
        for action, rule in actions:
            if action == "stop":
                self._begin_stop(f"health rule {rule}: action stop")
            elif action == "pause" and not self.paused and not self.stop_reason:
                self._set_paused(True)
                self._log.once("WARNING", f"paused by health rule {rule}; resume with `tbhealth resume {self._run_path}`")


def _written(path: Path | None, step: int) -> dict:
    """The acknowledgement's fields for a checkpoint written at ``step`` (if one was)."""
    return {"checkpoint": path.name, "path": str(path), "step": step} if path else {"step": step}
