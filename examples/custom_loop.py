"""Your own PyTorch loop, reporting to ``tbhealth.Monitor``: no config file, no Trainer.

    python examples/custom_loop.py --logdir runs --epochs 10      then   tbhealth board runs
    python examples/custom_loop.py --logdir runs --epochs 20 --resume runs/custom-loop/checkpoints/stop-step-000123.pt

The run gets everything ``tbhealth train`` gives: TensorBoard scalars, health alerts, and
``tbhealth pause|resume|stop|checkpoint`` (the monitor calls ``save`` at a step boundary).
``--resume`` continues the same run (its folder, progress and history) from one of its checkpoints.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import tbhealth
from tbhealth.training.data import digits

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--logdir", default="runs")
parser.add_argument("--name", default="custom-loop")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--resume", default=None, help="a checkpoint of the run to continue")
args = parser.parse_args()

torch.manual_seed(0)
train_set, val_set = digits(val_fraction=0.2, seed=0)  # 8x8 digits shipped with scikit-learn
loader = DataLoader(train_set, batch_size=64, shuffle=True)
x_val, y_val = val_set.tensors
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))  # activation modules: hooks see them
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
loss_fn = nn.CrossEntropyLoss()
saved = torch.load(args.resume, weights_only=False) if args.resume else None
if saved:
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])


def save(kind: str, monitor_state: dict):  # kind: "manual" (tbhealth checkpoint RUN) or "stop"
    step = monitor_state["global_step"]  # monitor_state: mon.state_dict(), to resume with load_state_dict
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "monitor": monitor_state}
    return mon.save_atomic(state, f"{kind}-step-{step:06d}.pt")  # <run>/checkpoints, temp file + rename


with tbhealth.Monitor(args.logdir, args.name, total_epochs=args.epochs, model=model, optimizer=opt,
                      checkpoint_fn=save, resume_state=saved["monitor"] if saved else None) as mon:
    for epoch in mon.epochs(batches_per_epoch=len(loader)):
        model.train()
        for x, y in loader:
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            mon.step(loss, n=len(x), correct=(out.argmax(1) == y).sum())  # tensors: no sync here
            opt.zero_grad()
            if mon.should_stop:  # a stop request or a health rule with action: stop
                break
        if mon.should_stop:
            break
        model.eval()
        with torch.no_grad():
            out = model(x_val)
        mon.end_epoch(val_loss=loss_fn(out, y_val).item(), val_acc=(out.argmax(1) == y_val).float().mean().item(),
                      val_count=len(y_val))  # the size of the validation set: how noisy val_acc is
print(f"{mon.state}: {mon.run_dir}")
