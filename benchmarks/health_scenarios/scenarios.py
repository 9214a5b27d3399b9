"""The corpus: failures each health rule must catch within a logging window of their onset, and
healthy runs (schedules, small batches, frozen layers, near-zero losses, sequence models) that
must raise nothing. Every run is seconds long on one CPU thread."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.health_scenarios import data, models
from benchmarks.health_scenarios.corpus import Scenario
from tbhealth.training.data import digits
from tbhealth.training.models import CNN

DIVERGE, NAN_AT, HANG_AT, CORRUPT_AT = 1, 37, 30, 30


def end_of_epoch(epoch: int) -> callable:
    return lambda history, per_epoch: epoch * per_epoch


def lasting_gap(history: list[dict], per_epoch: int, gap: float = 0.10, epochs: int = 3) -> int | None:
    """End of the first epoch that closes ``epochs`` in a row whose raw train − val accuracy gap
    exceeds ``gap``: where the documented condition (with its persistence) first holds, judged
    without the rule's noise and fit tests. A gap that closes again before lasting is no onset."""
    run = 0
    for h in history:
        wide = h["train_acc"] is not None and h["val_acc"] is not None and h["train_acc"] - h["val_acc"] > gap
        run = run + 1 if wide else 0
        if run == epochs:
            return h["epoch"] * per_epoch
    return None


def nan_inputs(step: int, x: torch.Tensor, y: torch.Tensor):
    """From step NAN_AT on, one sample per batch has a NaN feature (a corrupt record)."""
    if step >= NAN_AT:
        x = x.clone()
        x[0, 0] = float("nan")
    return x, y


def corrupt_batch(step: int, x: torch.Tensor, y: torch.Tensor):
    """The batch of step CORRUPT_AT has its features scaled by 1e3 (a unit mix-up in one file)."""
    return (x * 1e3 if step == CORRUPT_AT else x), y


def one_cycle(opt, per_epoch, epochs):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=per_epoch * epochs), "step"


def warmup_cosine(opt, per_epoch, epochs, warmup: int = 40):
    total = per_epoch * epochs

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor), "step"


def on_plateau(opt, per_epoch, epochs):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=1), "epoch"


def step_lr(opt, per_epoch, epochs):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3), "epoch"


sgd = partial(torch.optim.SGD)
images = partial(digits, as_images=True)
UNDERFIT_ONSET = end_of_epoch(11)  # the earliest the documented condition (10 flat epochs after one) holds

SCENARIOS: list[Scenario] = [
    # ---------------------------------------------------------------------------------- failures
    Scenario("lr_far_too_high", "MLP, SGD lr=50: the loss leaves 2.3 for 1e10 within steps", digits, models.mlp,
             epochs=2, optimizer=lambda p: sgd(p, lr=50.0), expect=frozenset({"divergence"}),
             also=frozenset({"exploding_gradients", "loss_spike", "dead_neurons"}), onset=DIVERGE),
    Scenario("nan_inputs", f"MLP, Adam; from step {NAN_AT} a NaN feature in every batch", digits, models.mlp,
             epochs=2, perturb=nan_inputs, expect=frozenset({"divergence"}), onset=NAN_AT),
    Scenario("exploding_at_init", "8-layer ReLU net, weights N(0, 0.3): first grad norm 7e3, settled by step 50",
             digits, partial(models.deep_relu_large_init, std=0.3), epochs=2,
             optimizer=lambda p: sgd(p, lr=1e-3), expect=frozenset({"exploding_gradients"}), onset=1),
    Scenario("exploding_behind_clipping", "as above, clipped to norm 1: the post-clip norm is always 1",
             digits, partial(models.deep_relu_large_init, std=0.3), epochs=2, clip=1.0,
             optimizer=lambda p: sgd(p, lr=1e-3), expect=frozenset({"exploding_gradients"}), onset=1),
    Scenario("vanishing_sigmoid", "12 sigmoid layers: first layers' grad norms ~1e-10", digits,
             partial(models.mlp, hidden=[32] * 12, activation="sigmoid"), epochs=2,
             expect=frozenset({"vanishing_gradients"}), onset=1),
    Scenario("vanishing_functional", "the same depth with torch.sigmoid in forward: no activation module",
             digits, models.DeepFunctionalSigmoid, epochs=2, expect=frozenset({"vanishing_gradients"}), onset=1),
    Scenario("dead_relu_layer", "MLP whose fc2 bias is -10: act2 outputs 0 for every input", digits,
             models.dead_layer_mlp, epochs=2, expect=frozenset({"dead_neurons"}), onset=1),
    Scenario("corrupt_batch", f"MLP, Adam; the batch of step {CORRUPT_AT} is scaled 1e3 (between logging steps)",
             digits, models.mlp, epochs=5, perturb=corrupt_batch, expect=frozenset({"divergence"}),
             also=frozenset({"loss_spike", "exploding_gradients"}), onset=CORRUPT_AT),
    Scenario("overfit_tiny_train", "MLP 256x256 on 90 training digits, validated on 360", data.few_digits,
             partial(models.mlp, hidden=(256, 256)), epochs=30, expect=frozenset({"overfitting"}),
             onset=lasting_gap),
    Scenario("underfit_linear_rings", "a linear model on two concentric rings: chance, nothing to overfit",
             data.rings, partial(models.mlp, in_features=2, out_features=2, hidden=()), epochs=13,
             optimizer=lambda p: torch.optim.Adam(p, lr=0.05), expect=frozenset({"underfitting"}),
             onset=UNDERFIT_ONSET),
    Scenario("lr_far_too_low", "MLP, SGD lr=1e-4: the loss creeps down by < 1 % an epoch", digits, models.mlp,
             epochs=13, optimizer=lambda p: sgd(p, lr=1e-4), expect=frozenset({"underfitting"}),
             onset=UNDERFIT_ONSET),
    Scenario("stalled_forward", f"a forward blocks 4 s at step {HANG_AT} (stalled.timeout_s 1.5)", digits,
             lambda: models.Hangs(models.mlp(), HANG_AT, 4.0), epochs=2, expect=frozenset({"stalled"}),
             onset=HANG_AT - 1, health={"stalled": {"timeout_s": 1.5}}),
    # ----------------------------------------------------------------------------------- healthy
    Scenario("default_example", "examples/digits.yaml: MLP, LayerNorm, dropout, Adam, StepLR", digits,
             partial(models.mlp, norm="layer", dropout=0.2), epochs=12, scheduler=step_lr,
             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-4)),
    Scenario("batchnorm_cnn_onecycle", "CNN with BatchNorm, OneCycleLR per step", images,
             partial(CNN, 1, 10, channels=(16, 32), norm="batch"), epochs=6, scheduler=one_cycle,
             optimizer=lambda p: sgd(p, lr=0.02, momentum=0.9)),
    Scenario("warmup_cosine", "GELU MLP, linear warmup then cosine decay per step", digits,
             partial(models.mlp, activation="gelu"), epochs=8, scheduler=warmup_cosine,
             optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)),
    Scenario("reduce_on_plateau", "MLP, ReduceLROnPlateau(patience=1) on val loss", digits, models.mlp,
             epochs=15, scheduler=on_plateau),
    Scenario("small_batch_sgd", "MLP, SGD momentum, batch 8: noisy losses and accuracies", digits, models.mlp,
             epochs=4, batch_size=8, optimizer=lambda p: sgd(p, lr=0.02, momentum=0.9)),
    Scenario("frozen_and_unused", "frozen first layer, an unused head, zero_grad(set_to_none=False)", digits,
             models.FrozenAndUnused, epochs=6, set_to_none=False),
    Scenario("regression_to_zero", "linear regression on a noiseless target: MSE falls to ~1e-12",
             data.exact_regression, partial(models.mlp, in_features=6, out_features=1, hidden=()), epochs=40,
             loss=F.mse_loss, classification=False, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)),
    Scenario("shallow_sigmoid", "one hidden layer of 64 sigmoid units", digits,
             partial(models.mlp, hidden=(64,), activation="sigmoid"), epochs=10),
    Scenario("functional_relu", "F.relu in forward: no activation module to hook", digits, models.FunctionalMLP,
             epochs=8),
    Scenario("lstm_language_model", "LSTM next-token model, (N, T) targets: accuracy over tokens",
             data.markov_text, models.LSTMLanguageModel, epochs=10, batch_size=32),
    Scenario("attention_gpt_block", "2-block causal transformer with GPT-2's NewGELUActivation", data.markov_text,
             models.TinyGPT, epochs=8, batch_size=32, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)),
    Scenario("long_converged", "small MLP on overlapping blobs (80 %), constant LR, 30 epochs: flat from ~8",
             partial(data.blobs, spread=3.0), partial(models.mlp, in_features=10, out_features=4, hidden=(32,)),
             epochs=30, batch_size=256,
             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3)),
]

BY_NAME = {s.name: s for s in SCENARIOS}
