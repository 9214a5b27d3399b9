"""Run state on disk: the only part of tbhealth the TensorBoard plugin and the CLI readers import.

Torch-free and light. ``files`` (atomic snapshots, locked appends, the format version),
``states`` (the run states and what readers make of them), ``names`` (run names that never
leave the logdir), ``rundir`` (where each file of one run lives, typed reads and writes),
``status`` (the status document, built and read) and ``schema`` (the JSON shapes promised to
outside tools, with validators).
"""

from tbhealth.run.files import FORMAT_VERSION, read_records
from tbhealth.run.names import RunNameError, list_run_dirs, resolve_run, run_name, unique_run_dir
from tbhealth.run.rundir import ControlRequest, RunDir
from tbhealth.run.states import (
    COMMANDS, FINAL_STATES, LIVE_STATES, READ_STATES, STALE_AFTER_S, STATES, UNRESPONSIVE, State,
    effective_state, is_live,
)

__all__ = [
    "FORMAT_VERSION", "read_records", "RunNameError", "list_run_dirs", "resolve_run", "run_name", "unique_run_dir",
    "ControlRequest", "RunDir", "COMMANDS", "FINAL_STATES", "LIVE_STATES", "READ_STATES", "STALE_AFTER_S",
    "STATES", "UNRESPONSIVE", "State", "effective_state", "is_live",
]
