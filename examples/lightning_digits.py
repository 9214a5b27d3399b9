"""A Lightning module on the 8x8 digits (shipped with scikit-learn: no download), monitored by tbhealth.

    python examples/lightning_digits.py --logdir lightning_runs           then   tbhealth board lightning_runs
    python examples/lightning_digits.py --devices 2                      two CPU processes (DDP, Gloo)
    python examples/lightning_digits.py --resume lightning_runs/lightning_logs/version_0/tbhealth/checkpoints/stop-step-000040.ckpt

From another shell: ``tbhealth pause|resume|stop|checkpoint lightning_logs/version_0/tbhealth --logdir lightning_runs``.
A stop writes ``stop-step-N.ckpt`` in the run's ``checkpoints/``; ``--resume`` on it continues the same run.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from tbhealth.integrations.lightning import TBHealthCallback
from tbhealth.training.data import digits


class DigitsModule(L.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))  # activation modules: tbhealth sees them
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = nn.functional.cross_entropy(out, y)
        return {"loss": loss, "correct": (out.argmax(1) == y).sum()}  # "correct": train accuracy in tbhealth

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))  # the names TBHealthCallback reads
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="lightning_runs", help="Trainer(default_root_dir=...)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 or more: DDP over Gloo)")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val (tbhealth reports the norm before it)")
    parser.add_argument("--log-every", type=int, default=10, help="tbhealth's per-step read-back cadence")
    parser.add_argument("--resume", default=None, help="a checkpoint to continue from (ckpt_path)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace, module: L.LightningModule | None = None, **monitoring) -> L.Trainer:
    """Train; ``monitoring``: more TBHealthCallback arguments (``health=...``)."""
    L.seed_everything(0, verbose=False)
    train, val = digits(val_fraction=0.2, seed=0)
    trainer = L.Trainer(
        max_epochs=args.epochs, default_root_dir=args.logdir, accelerator="cpu", devices=args.devices,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=args.clip, log_every_n_steps=5, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TBHealthCallback(log_every=args.log_every, **monitoring)],
    )
    trainer.fit(module or DigitsModule(), DataLoader(train, batch_size=64, shuffle=True),
                DataLoader(val, batch_size=256), ckpt_path=args.resume)
    return trainer


if __name__ == "__main__":
    main(parse_args())
