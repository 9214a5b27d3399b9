"""Python stacks of live threads, for the ``stalled`` alert: where a hung step is waiting.

Read from another thread (the watchdog) with ``sys._current_frames()``: a snapshot that costs
nothing until a stall is suspected, and needs no cooperation from the hung thread. A thread
blocked inside C code (a CUDA sync, a collective) shows the Python line that called into it.
"""

from __future__ import annotations

import sys
import threading
import traceback


def thread_stack(ident: int | None, *, all_threads: bool = False) -> str | None:
    """The formatted stack of thread ``ident`` (innermost call last), headed by the thread's name;
    with ``all_threads`` every live thread's, the given one first. None when it has ended."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    order = [ident] + ([i for i in frames if i != ident] if all_threads else [])
    parts = [f'Thread "{names.get(i, i)}":\n' + "".join(traceback.format_stack(frames[i]))
             for i in order if i in frames]
    return "\n".join(parts) if parts else None
