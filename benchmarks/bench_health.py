"""How right, early and quiet the health verdicts are, on a corpus of real short trainings.

Each scenario of ``benchmarks/health_scenarios/scenarios.py`` trains a small model for seconds
through ``tbhealth.Monitor`` in a plain loop, at the Monitor's default cadence (``log_every`` 50,
``health.every_steps`` 50) unless the scenario says otherwise. For each it prints:

- ``raised``: the rules that opened an alert, ``×n`` when a rule opened n episodes (flapping);
- ``onset``: the step where the failure begins (injected, or where its documented condition
  first holds in the run's own history); ``detected``: the step of the expected rule's first
  alert; ``delay``: detected − onset, in steps (``per epoch`` says how long an epoch is);
- ``wrong``: alerts that should not be there: any alert on a healthy run; on a failure run a rule
  that is neither expected nor a consequence of the same root cause (listed per scenario);
- ``ok``: expected rules all raised, nothing wrong, and (failures) caught within one logging
  window (``log_every`` steps) of onset, or within one epoch for the epoch-level rules.

    python benchmarks/bench_health.py                 # all scenarios, a few minutes on one core
    python benchmarks/bench_health.py nan_inputs stalled_forward
    python benchmarks/bench_health.py --markdown      # the table for benchmarks/README.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.health_scenarios` from anywhere

import torch  # noqa: E402

from benchmarks.health_scenarios.corpus import Outcome, run  # noqa: E402
from benchmarks.health_scenarios.scenarios import BY_NAME, SCENARIOS  # noqa: E402

EPOCH_RULES = frozenset({"overfitting", "underfitting", "plateau"})
COLUMNS = ("scenario", "kind", "expected", "raised", "onset", "detected", "delay", "per epoch", "wrong", "ok")


def verdict(o: Outcome) -> bool:
    if o.missed or o.wrong:
        return False
    if not o.scenario.failure:
        return True
    per_epoch = o.steps // max(1, len(o.history))
    epoch_level = set(o.scenario.expect) <= EPOCH_RULES
    budget = per_epoch if epoch_level else o.scenario.log_every
    return o.delay is not None and 0 <= o.delay <= budget


def row(o: Outcome) -> tuple[str, ...]:
    s = o.scenario
    raised = ", ".join(f"{r}×{n}" if n > 1 else r for r, n in sorted(o.episodes.items())) or "—"
    delay = "—" if o.delay is None else str(o.delay)
    return (s.name, "failure" if s.failure else "healthy", ", ".join(sorted(s.expect)) or "—", raised,
            "—" if o.onset is None else str(o.onset), "—" if o.detected is None else str(o.detected), delay,
            str(o.steps // max(1, len(o.history))), ", ".join(sorted(o.wrong)) or "0", "✓" if verdict(o) else "✗")


def table(rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*COLUMNS), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="scenarios to run (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--logdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-health-"))
    outcomes, began = [], time.perf_counter()
    for scn in [BY_NAME[n] for n in args.names] or SCENARIOS:
        outcomes.append(run(scn, logdir))
        print(f"  {scn.name}: {outcomes[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    print(table([row(o) for o in outcomes], args.markdown))
    failures = [o for o in outcomes if o.scenario.failure]
    healthy = [o for o in outcomes if not o.scenario.failure]
    print(f"\n{sum(map(verdict, failures))}/{len(failures)} failures caught in time by their rule, "
          f"{sum(bool(o.wrong) for o in healthy)}/{len(healthy)} healthy runs with a false alarm, "
          f"{sum(bool(o.wrong) for o in failures)} failure runs with a wrong extra rule; "
          f"{time.perf_counter() - began:.0f} s in all (torch {torch.__version__}, {platform.processor() or 'cpu'}, "
          f"1 thread); runs in {logdir}")
    return 0 if all(map(verdict, outcomes)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
