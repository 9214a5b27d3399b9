"""The reference side of the overhead benchmarks: a plain PyTorch script, optionally reporting to a Monitor.

Without ``--monitor`` this is what a user would write by hand for the digits examples
(``examples/digits.yaml`` = ``--model mlp``, ``examples/digits_cnn.yaml`` = ``--model cnn``): the
same data split, model, loss, optimizer, scheduler and batch size, trained with device-side sums
of the train loss and accuracy and of the validation loss and accuracy, read back once per epoch.
It imports nothing from tbhealth. With ``--monitor VARIANT`` the same loop reports to
``tbhealth.Monitor`` the way ``examples/custom_loop.py`` does (``mon.step`` every step,
``mon.end_epoch`` with the validation figures), with parts of the Monitor switched off through
its public arguments.

The timing hook is shared by both: ``time.time()`` when the first step is done (after its loss is
on the host) and when each epoch's validation figures are on the host. ``--out`` writes them as
JSON; ``benchmarks/bench_overhead.py`` and ``benchmarks/gpu_check.py`` run this file.

    python benchmarks/plain_loop.py --model mlp --epochs 3 --out /tmp/t.json
    python benchmarks/plain_loop.py --model cnn --monitor default --logdir /tmp/runs --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

T_IMPORTS = time.time()  # noqa: E402 - the timing starts before torch is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

#: Monitor arguments per variant of the custom loop (``None``: the plain loop, no Monitor).
MONITOR_VARIANTS: dict[str, dict] = {
    "default": {},
    "no-health": {"health": False},
    "no-logging": {"log_every": 10**9},
    "no-system": {"system_metrics": False},
}
LOG_EVERY = 5  # examples/*.yaml: logging.every_steps
HEALTH = {"every_steps": 10}  # examples/digits.yaml: health.every_steps


def load_digits(how: str):
    """scikit-learn's 8x8 digits: ``sklearn`` calls ``load_digits`` (importing scikit-learn, ~2 s),
    ``file`` reads the gzipped CSV it ships directly, as tbhealth's built-in ``digits`` does, so
    that start-up compares the frameworks and not two ways of reading the same file."""
    if how == "sklearn":
        from sklearn.datasets import load_digits as load

        return load(return_X_y=True)
    import gzip
    import importlib.util

    import numpy as np

    folder = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    with gzip.open(f"{folder}/datasets/data/digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def digits(as_images: bool, how: str = "file", seed: int = 0, val_fraction: float = 0.2
           ) -> tuple[TensorDataset, TensorDataset]:
    """The digits scaled to 0-1, split as tbhealth's built-in ``digits`` splits them."""
    x_np, y_np = load_digits(how)
    x, y = torch.from_numpy(x_np).float() / 16.0, torch.from_numpy(y_np).long()
    if as_images:
        x = x.reshape(-1, 1, 8, 8)
    n_val = round(len(x) * val_fraction)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (TensorDataset(x[order[n_val:]], y[order[n_val:]]), TensorDataset(x[order[:n_val]], y[order[:n_val]]))


def mlp() -> nn.Module:
    """examples/digits.yaml: hidden [128, 64], LayerNorm, ReLU, dropout 0.2."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.LayerNorm(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


def cnn() -> nn.Module:
    """examples/digits_cnn.yaml: channels [16, 32], BatchNorm, ReLU, 2x2 max-pool, dropout 0.1."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4, 10))


def optimization(model_name: str, model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    if model_name == "mlp":  # Adam + StepLR(5, 0.3), stepped per epoch
        opt = torch.optim.Adam(model.parameters(), lr=0.003, weight_decay=1e-4)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=2)


class Timing:
    """The shared timing hook: wall times of the first finished step and of each epoch's start and
    end, and the process's CPU time at each epoch's end."""

    def __init__(self) -> None:
        self.first_step: float | None = None
        self.first_step_cpu: float | None = None  # process CPU seconds (all threads) when it was done
        self.epoch_starts: list[float] = []
        self.epoch_ends: list[float] = []
        self.epoch_cpu: list[float] = []  # process CPU seconds (all threads) at each epoch end


def train(args: argparse.Namespace, timing: Timing, step_guard=None) -> dict:
    """Train and return the last epoch's figures. ``step_guard(step)`` -> a context around each step."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    train_set, val_set = digits(as_images=args.model == "cnn", how=args.data)
    pin = device.type == "cuda"
    loader = DataLoader(train_set, batch_size=64, shuffle=True, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=64, pin_memory=pin)
    model = (mlp() if args.model == "mlp" else cnn()).to(device)
    opt, sched = optimization(args.model, model)
    loss_fn = nn.CrossEntropyLoss()
    mon = open_monitor(args, model, opt, len(loader)) if args.monitor else None
    epochs = mon.epochs(batches_per_epoch=len(loader)) if mon else range(1, args.epochs + 1)
    step, figures = 0, {}
    with mon if mon else contextlib.nullcontext():
        for _ in epochs:
            timing.epoch_starts.append(time.time())
            model.train()
            loss_sum, correct, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                step += 1
                with step_guard(step) if step_guard else contextlib.nullcontext():
                    out = model(x)
                    loss = loss_fn(out, y)
                    loss.backward()
                    opt.step()
                    hits = (out.argmax(1) == y).sum()
                    if mon:
                        mon.step(loss, n=len(x), correct=hits)
                    else:
                        loss_sum += loss.detach() * len(x)
                        correct += hits
                        count += len(x)
                    opt.zero_grad(set_to_none=True)
                if timing.first_step is None:
                    loss.item()  # the first step is done when its loss could be printed
                    timing.first_step, timing.first_step_cpu = time.time(), time.process_time()
            figures = validate(model, loss_fn, val_loader, device)
            if mon:
                figures = mon.end_epoch(val_loss=figures["val_loss"], val_acc=figures["val_acc"])
            else:
                train_loss, train_acc = (torch.stack([loss_sum, correct]) / max(count, 1)).tolist()
                figures |= {"train_loss": train_loss, "train_acc": train_acc}
            timing.epoch_ends.append(time.time())
            timing.epoch_cpu.append(time.process_time())
            sched.step(figures["val_loss"]) if args.model == "cnn" else sched.step()
    return figures


@torch.no_grad()
def validate(model: nn.Module, loss_fn: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    model.eval()
    loss_sum, correct, count = (torch.zeros((), device=device) for _ in range(3))
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += loss_fn(out, y) * len(x)
        correct += (out.argmax(1) == y).sum()
        count += len(x)
    val_loss, val_acc = (torch.stack([loss_sum, correct]) / count).tolist()
    return {"val_loss": val_loss, "val_acc": val_acc}


def open_monitor(args: argparse.Namespace, model: nn.Module, opt: torch.optim.Optimizer, batches: int):
    import tbhealth

    kwargs = {"health": HEALTH, "log_every": LOG_EVERY} | MONITOR_VARIANTS[args.monitor]
    return tbhealth.Monitor(args.logdir, f"loop-{args.model}-{args.monitor}", total_epochs=args.epochs,
                            model=model, optimizer=opt, verbose=False, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--monitor", choices=sorted(MONITOR_VARIANTS), help="report to a Monitor (default: plain)")
    parser.add_argument("--logdir", default="runs", help="where the Monitor's run goes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data", choices=("file", "sklearn"), default="file",
                        help="read the digits file directly (as tbhealth does) or through sklearn's load_digits")
    parser.add_argument("--out", help="write the timings here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    timing = Timing()
    figures = train(args, timing)
    result = {"imports_start": T_IMPORTS, "first_step": timing.first_step,
              "first_step_cpu": timing.first_step_cpu, "epoch_starts": timing.epoch_starts,
              "epoch_ends": timing.epoch_ends, "epoch_cpu": timing.epoch_cpu, "figures": figures}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
