"""The shipped framework examples, run as the integration tests need them: slowed down so that a
control request meets a live run, or with a NaN planted in the loss at a given optimizer step.

    python tests/integration_apps.py lightning [--nan-at N] [--step-sleep S] [example options]
    python tests/integration_apps.py hf [--nan-at N] [--step-sleep S] [example options]

Nothing is faked: the model, the framework's Trainer and tbhealth's callback are the real ones.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def split_args(argv: list[str]) -> tuple[int | None, float, list[str]]:
    """``--nan-at`` and ``--step-sleep`` for this file; the rest for the example."""
    nan_at, sleep, rest, it = None, 0.0, [], iter(argv)
    for arg in it:
        if arg == "--nan-at":
            nan_at = int(next(it))
        elif arg == "--step-sleep":
            sleep = float(next(it))
        else:
            rest.append(arg)
    return nan_at, sleep, rest


def stop_on_divergence(nan_at: int | None) -> dict:
    """With a planted NaN, the divergence rule stops the run (its default action only warns)."""
    return {"health": {"divergence": {"action": "stop"}}} if nan_at is not None else {}


def lightning(argv: list[str]) -> None:
    import lightning_digits as ex

    nan_at, sleep, rest = split_args(argv)

    class Planted(ex.DigitsModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            time.sleep(sleep)
            if nan_at is not None and self.trainer.global_step + 1 >= nan_at:
                out["loss"] = out["loss"] * float("nan")
            return out

    ex.main(ex.parse_args(rest), Planted(), **stop_on_divergence(nan_at))


def hf(argv: list[str]) -> None:
    import hf_tiny as ex
    from transformers import BertForSequenceClassification

    nan_at, sleep, rest = split_args(argv)

    class Planted(BertForSequenceClassification):
        optimizer_steps = 0

        def forward(self, input_ids=None, labels=None, **kwargs):  # named: the Trainer keeps these columns
            out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
            if self.training:
                time.sleep(sleep)
                self.optimizer_steps += 1  # one micro-batch per step in these tests
                if nan_at is not None and self.optimizer_steps >= nan_at:
                    out.loss = out.loss * float("nan")
            return out

    ex.main(ex.parse_args(rest), Planted(ex.tiny_bert().config), **stop_on_divergence(nan_at))


if __name__ == "__main__":
    {"lightning": lightning, "hf": hf}[sys.argv[1]](sys.argv[2:])
