"""``tbhealth train`` as the ``tbhealth`` script runs it, plus the process CPU time when step 1 is done.

    python benchmarks/startup_probe.py OUT.json train CONFIG [options...]

Wall-clock start-up is at the mercy of other jobs on a shared machine; the process's own CPU time
until its first step is much steadier. ``plain_loop.py`` records the same figure
(``first_step_cpu``), so ``bench_overhead.py`` compares the two. The probe only wraps the trainer's
``Monitor.step`` on the instance, to read ``time.process_time()`` when step 1 returns (at
``logging.every_steps=1`` that step has read its loss back to the host, like the plain script's).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    out, sys.argv = sys.argv[1], ["tbhealth", *sys.argv[2:]]
    import tbhealth_cli.app as app
    import tbhealth_cli.train as train

    seen: dict[str, float] = {}
    new_trainer = train._new_trainer

    def probed(*args, **kwargs):
        trainer = new_trainer(*args, **kwargs)
        step = trainer.monitor.step

        def first_step(*a, **k):
            result = step(*a, **k)
            seen.setdefault("first_step_cpu", time.process_time())
            return result

        trainer.monitor.step = first_step
        return trainer

    train._new_trainer = probed
    try:
        app.main()
    finally:
        with open(out, "w") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    main()
