"""The shipped framework examples, run as the integration tests need them: slowed down so that a
control request meets a live run, or with a NaN planted in the loss at a given optimizer step.

    python tests/integration_apps.py lightning [--nan-at N] [--step-sleep S] [--record F] [--stop-at N] [example options]
    python tests/integration_apps.py hf [--nan-at N] [--step-sleep S] [example options]

``--nan-at N``: the loss is NaN from optimizer step N on. ``--record F`` (Lightning): every
micro-batch's loss, right predictions and size, and every optimizer step's gradient norm before
clipping, as the module itself sees them, one JSON line each, for the test to compare with what
tbhealth recorded. A Lightning exit on SIGTERM prints ``SIGTERMException``: Lightning's own handler
ran. Nothing is faked: the model, the framework's Trainer and tbhealth's callback are the real ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """``--nan-at``, ``--step-sleep`` and ``--record`` for this file; the rest for the example."""
    mine, rest, it = {"nan_at": None, "sleep": 0.0, "record": None, "stop_at": None, "stop_after": None}, [], iter(argv)
    options = {"--nan-at": ("nan_at", int), "--step-sleep": ("sleep", float), "--record": ("record", str),
               "--stop-at": ("stop_at", int), "--stop-after-epoch": ("stop_after", int)}
    for arg in it:
        if arg in options:
            key, kind = options[arg]
            mine[key] = kind(next(it))
        else:
            rest.append(arg)
    return mine, rest


def stop_on_divergence(nan_at: int | None) -> dict:
    """With a planted NaN, the divergence rule stops the run (its default action only warns)."""
    return {"health": {"divergence": {"action": "stop"}}} if nan_at is not None else {}


def lightning(argv: list[str]) -> None:
    import lightning_digits as ex
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    mine, rest = split_args(argv)
    nan_at, record = mine["nan_at"], open(mine["record"], "w") if mine["record"] else None

    def note(**fields):
        if record is not None:
            record.write(json.dumps(fields) + "\n")
            record.flush()

    class Planted(ex.DigitsModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            time.sleep(mine["sleep"])
            step = self.trainer.global_step + 1  # the optimizer step this micro-batch belongs to
            if nan_at is not None and step >= nan_at:
                out["loss"] = out["loss"] * float("nan")
            note(step=step, loss=out["loss"].item(), correct=out["correct"].item(), n=len(batch[0]))
            if step == mine["stop_at"]:  # what `tbhealth stop` does, at a chosen step
                self.stop("test")
            return out

        def on_validation_epoch_end(self):  # a request that arrives while the epoch validates
            if not self.trainer.sanity_checking and self.current_epoch + 1 == mine["stop_after"]:
                self.stop("test, between epochs")

        def stop(self, reason):
            next(c for c in self.trainer.callbacks if hasattr(c, "monitor")).monitor.request_stop(reason)

        def on_before_optimizer_step(self, optimizer):  # after tbhealth's callback, before clipping
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            note(step=self.trainer.global_step + 1, grad_norm=torch.nn.utils.get_total_norm(grads).item())

    try:
        ex.main(ex.parse_args(rest), Planted(), **stop_on_divergence(nan_at))
    except SIGTERMException:
        print("SIGTERMException")
        raise


def hf(argv: list[str]) -> None:
    import hf_tiny as ex
    from transformers import BertForSequenceClassification

    mine, rest = split_args(argv)
    nan_at, args = mine["nan_at"], ex.parse_args(rest)

    class Planted(BertForSequenceClassification):
        micro_batches = 0

        def forward(self, input_ids=None, labels=None, **kwargs):  # named: the Trainer keeps these columns
            out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
            if self.training:
                time.sleep(mine["sleep"])
                self.micro_batches += 1
                step = -(-self.micro_batches // args.accumulate)  # the optimizer step (full windows here)
                if nan_at is not None and step >= nan_at:
                    out.loss = out.loss * float("nan")
            return out

    ex.main(args, Planted(ex.tiny_bert().config), **stop_on_divergence(nan_at))


if __name__ == "__main__":
    {"lightning": lightning, "hf": hf}[sys.argv[1]](sys.argv[2:])
