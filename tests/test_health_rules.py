"""Health rules on literal histories: below, at and above each threshold, verdict and message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tbhealth.health import RULE_IDS, RULES, EpochMetrics, HealthConfig, Observation, check, evaluate
from tbhealth.health.settings import RuleSettings


FIRING, HOLDING, CLEAR, UNCHECKED = "firing", "holding", "clear", None


def verdict(rule: str, obs: Observation, **settings) -> tuple[str | None, str]:
    """``(status, message)`` of ``rule`` this round: firing, holding, clear; ``(None, "")`` when
    the rule was not checked (its inputs were missing)."""
    findings, checked = check(obs, HealthConfig(**{rule: {"enabled": True, **settings}}))
    if rule not in checked:
        assert not [f for f in findings if f.rule == rule]
        return UNCHECKED, ""
    mine = [f for f in findings if f.rule == rule]
    if mine:
        [f] = mine  # one root cause, one finding per rule
        return f.status, f.message
    [message] = [m for key, m in checked.cleared.items() if key.split("@")[0] == rule]
    return CLEAR, message


def steps(*losses: float) -> list[tuple[int, float]]:
    return [(i + 1, v) for i, v in enumerate(losses)]


def epochs(train, val=None, train_acc=None, val_acc=None, lr=None, counts=(None, None)) -> list[EpochMetrics]:
    n = len(train)
    val, train_acc, val_acc, lr = (x if x is not None else [None] * n for x in (val, train_acc, val_acc, lr))
    return [EpochMetrics(i, t, v, ta, va, r, *counts)
            for i, (t, v, ta, va, r) in enumerate(zip(train, val, train_acc, val_acc, lr))]


def expect(rule: str, obs: Observation, status: str | None, fragment: str = "", **settings) -> str:
    got, message = verdict(rule, obs, **settings)
    assert (got, fragment in message) == (status, True), message
    if status == CLEAR:  # a resolved alert's message never prints the firing condition as true
        assert message.startswith(("Resolved: ", "[rank")) and "not yet" not in message
    return message


# --------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize(
    ("obs", "settings", "status", "fragment"),
    [
        (Observation(step_losses=steps(2.31, 11.0), initial_loss=2.31), {}, CLEAR,
         "Resolved: step 2 loss 11 <= 5 × initial loss 2.31 (11.6)."),
        (Observation(step_losses=steps(2.31, 23.0), initial_loss=2.31), {}, HOLDING,
         "Loss diverged, not yet cleared: step 2 loss 23 <= 10 × initial loss 2.31 (23.1) but > 5 × initial"),
        (Observation(step_losses=steps(2.31, 23.1), initial_loss=2.31), {}, HOLDING, "not yet cleared"),
        (Observation(step_losses=steps(2.31, 45.2), initial_loss=2.31), {}, FIRING,
         "Loss diverged: step 2 loss 45.2 > 10 × initial loss 2.31 (23.1). Consider lowering the learning rate"),
        (Observation(step=50, step_losses=[(50, 3e20)], window_start=1, initial_loss=1.6e3), {}, FIRING,
         "Loss diverged: largest step loss of steps 1–50 3e+20 > 10 × initial loss 1.6e+03"),
        (Observation(step_losses=steps(1.0, 4.0), initial_loss=1.0), {"factor": 3.0}, FIRING,
         "4 > 3 × initial loss 1 (3)"),
        (Observation(step_losses=steps(1.0, 2.0), initial_loss=1.0), {"factor": 3.0}, HOLDING,
         "but > 1.5 × initial loss 1 (1.5)"),  # resolve_factor follows factor: 3 / 2
        (Observation(step_losses=steps(2.0, float("nan")), initial_loss=2.0), {}, FIRING,
         "non-finite (NaN/Inf) loss"),
        (Observation(step=100, window_start=51, step_losses=[(100, 2.0)], nonfinite="loss", initial_loss=2.0), {},
         FIRING, "non-finite (NaN/Inf) loss in steps 51–100"),  # a NaN step between two logging steps
        (Observation(nonfinite="gradients"), {}, FIRING, "non-finite (NaN/Inf) gradients"),
        (Observation(nonfinite="gradients"), {"nonfinite_gradients": False}, UNCHECKED, ""),
        (Observation(epochs=epochs([1.0], [float("inf")])), {}, FIRING, "non-finite (NaN/Inf) val loss"),
        (Observation(epochs=epochs([30.0]), initial_loss=2.0), {}, FIRING,
         "epoch 0 train loss 30 > 10 × initial loss 2 (20)"),
        (Observation(epochs=epochs([30.0])), {}, UNCHECKED, ""),  # no initial loss: not "healthy"
        (Observation(step_losses=steps(-1.0, 50.0), initial_loss=-1.0), {}, CLEAR,
         "no positive initial loss to compare with"),
    ],
)
def test_divergence(obs, settings, status, fragment):
    expect("divergence", obs, status, fragment, **settings)


def test_divergence_message_states_the_action_and_is_critical():
    cfg = HealthConfig(divergence={"action": "pause"})
    [finding] = evaluate(Observation(step_losses=steps(1.0, 50.0), initial_loss=1.0), cfg)
    assert finding.severity == "critical" and finding.action == "pause" and finding.firing
    assert finding.message.endswith("Pausing training (health.divergence.action: pause).")
    assert (finding.value, finding.threshold, finding.layer, finding.key) == (50.0, 10.0, None, "divergence")


# ------------------------------------------------------------------------------------- memory

GIB = 2**30


@pytest.mark.parametrize(
    ("used", "status", "fragment"),
    [
        (89, CLEAR, "Resolved: 89.0 of 100.0 GiB used (89%) <= 90%"),
        (94, HOLDING, "GPU memory nearly full, not yet cleared: 94.0 of 100.0 GiB used (94%) <= 95% but > 90%"),
        (95, HOLDING, "<= 95%"),
        (96, FIRING, "GPU memory nearly full: 96.0 of 100.0 GiB used (96%) > 95%"),
    ],
)
def test_memory(used, status, fragment):
    expect("memory", Observation(gpu_memory_used=used * GIB, gpu_memory_total=100 * GIB), status, fragment)


def test_memory_not_checked_without_gpu():
    assert verdict("memory", Observation()) == (UNCHECKED, "")


# --------------------------------------------------------------------------- gradient norms


@pytest.mark.parametrize(
    ("norm", "history", "extra", "settings", "status", "fragment"),
    [
        (400.0, [], {}, {}, CLEAR, "Resolved: global grad norm 400 <= 500"),
        (999.0, [], {}, {}, HOLDING, "not yet cleared: global grad norm 999 <= 1e+03 but > 500"),
        (1000.0, [], {}, {}, HOLDING, ""),
        (2300.0, [], {}, {}, FIRING, "Exploding gradients: global grad norm 2.3e+03 > 1e+03"),
        (4.0, [1] * 5, {}, {}, CLEAR, "<= 500"),
        (9.9, [1] * 5, {}, {}, HOLDING, "global grad norm 9.9 <= 10 × recent median 1 (10) but > 5 ×"),
        (11.0, [1] * 5, {}, {}, FIRING, "global grad norm 11 > 10 × recent median 1 (10)"),
        (11.0, [1] * 4, {}, {}, CLEAR, ""),  # fewer than min_history earlier windows: absolute test only
        (11.0, [1] * 5, {}, {"ratio": None}, CLEAR, ""),
        (11.0, [1] * 5, {"initial_grad_norm": 20.0}, {}, CLEAR, ""),  # still below where the run started
        (2e-3, [1e-4] * 5, {"initial_grad_norm": 1.0}, {}, CLEAR, ""),  # a regression's tiny norms near 0 loss
        (float("inf"), [1] * 5, {}, {}, UNCHECKED, ""),  # non-finite is divergence's finding
    ],
)
def test_exploding_gradients(norm, history, extra, settings, status, fragment):
    obs = Observation(global_grad_norm=norm, grad_norm_history=history, **extra)
    expect("exploding_gradients", obs, status, fragment, **settings)


@pytest.mark.parametrize(
    ("first", "status", "fragment"),
    [
        (2e-6, CLEAR, "Resolved: no layer has vanishing gradients: every layer >= 1e-06 (nearest: 'net.0' 2e-06)"),
        (1.1e-7, HOLDING, "Layer 'net.0' has vanishing gradients, not yet cleared: grad norm 1.1e-07 >= 1e-07 but < 1e-06"),
        (1e-7, HOLDING, ""),
        (3.2e-9, FIRING,
         "Layer 'net.0' has vanishing gradients: grad norm 3.2e-09 < 1e-07. Consider ReLU/residual connections"),
        (0.0, CLEAR, "every layer >= 1e-06"),  # exactly 0: no gradient reaches it (unused, dead path), not vanishing
    ],
)
def test_vanishing_gradients_per_layer(first, status, fragment):
    obs = Observation(layer_grad_norms={"net.0": first, "net.2": 0.5}, global_grad_norm=0.5)
    expect("vanishing_gradients", obs, status, fragment)


def test_one_alert_for_all_vanishing_layers_worst_first_with_their_values():
    norms = {f"fc{i}": 10.0 ** -(13 - i) for i in range(1, 8)} | {"out": 0.4}
    [f] = evaluate(Observation(layer_grad_norms=norms, rank=2), HealthConfig())
    assert f.layers == tuple((f"fc{i}", 10.0 ** -(13 - i)) for i in range(1, 6))  # < 1e-7: fc1..fc5
    assert (f.layer, f.value, f.key, f.rank) == ("fc1", 1e-12, "vanishing_gradients@2", 2)
    assert f.message.startswith("[rank 2] 5 layers have vanishing gradients, worst 'fc1': grad norm 1e-12 < 1e-07 "
                                "(also fc2 1e-11, fc3 1e-10, fc4 1e-09, fc5 1e-08)")


def test_a_long_layer_list_is_cut_in_the_message_but_kept_in_the_finding():
    [f] = evaluate(Observation(dead_fraction={f"act{i}": 0.6 + i / 100 for i in range(12)}), HealthConfig())
    assert len(f.layers) == 12 and f.layers[0] == ("act11", 0.71) and "and 6 more" in f.message
    assert "(also act10 70%, act9 69%," in f.message  # each value in the rule's unit


@pytest.mark.parametrize(
    ("fraction", "status", "fragment"),
    [
        (0.4, CLEAR, "Resolved: no layer has dead units: every layer <= 40% (nearest: 'net.1' 40%)"),
        (0.45, HOLDING, "Layer 'net.1' has dead units, not yet cleared: 45% output 0 for every sampled input <= 50% but > 40%"),
        (0.5, HOLDING, ""),
        (0.62, FIRING, "Layer 'net.1' has dead units: 62% output 0 for every sampled input > 50%"),
    ],
)
def test_dead_neurons(fraction, status, fragment):
    expect("dead_neurons", Observation(dead_fraction={"net.1": fraction, "net.3": 0.0}), status, fragment)


def test_per_layer_rules_are_not_checked_without_a_sample():
    assert verdict("dead_neurons", Observation(step_losses=steps(1.0))) == (UNCHECKED, "")
    assert verdict("vanishing_gradients", Observation(global_grad_norm=1.0)) == (UNCHECKED, "")


# ------------------------------------------------------------------------------- loss spikes


@pytest.mark.parametrize(
    ("history", "initial", "status", "fragment"),
    [
        ([1, 1, 1, 1, 1, 2.5], None, CLEAR, "Resolved: step 6 loss 2.5 <= 2.5 × recent median 1 (2.5)"),
        ([1, 1, 1, 1, 1, 4.9], None, HOLDING, "Loss spike, not yet cleared"),
        ([1, 1, 1, 1, 1, 5.0], None, HOLDING, ""),
        ([1, 1, 1, 1, 1, 5.1], None, FIRING, "Loss spike: step 6 loss 5.1 > 5 × recent median 1 (5)"),
        ([1, 1, 1, 1, 5.1], None, UNCHECKED, ""),  # fewer than min_history earlier windows
        ([9, 9, 1, 1, 1, 1, 1, 5.1], None, FIRING, "recent median 1 (5)"),  # median, not mean
        ([1e-6] * 5 + [1e-4], 1.0, CLEAR, ""),  # a regression near 0 loss: below 0.1 x initial, noise
        ([0.05] * 5 + [0.3], 2.3, FIRING, ""),  # a classifier's real spike: above 0.1 x its initial loss
    ],
)
def test_loss_spike(history, initial, status, fragment):
    expect("loss_spike", Observation(step_losses=steps(*history), initial_loss=initial), status, fragment)


def test_loss_spike_window_limits_history():
    history = steps(*([100.0] * 30 + [1.0] * 5 + [6.0]))
    expect("loss_spike", Observation(step_losses=history), FIRING, "recent median 1 (5)", window=5)


# -------------------------------------------------------------------------------- overfitting


@pytest.mark.parametrize(
    ("val", "train", "status", "fragment"),
    [
        ([1.0, 1.1, 1.2], [0.1] * 3, HOLDING, "not yet cleared: val loss 1.2 > 1.05 × its best 1 (1.05)"),
        ([1.3, 1.0, 1.1, 1.2, 1.2], [0.1] * 5, HOLDING, ""),  # the run of rises broke, val still far above best
        ([1.0, 1.1, 1.2, 1.3], [0.1] * 4, FIRING,
         "Overfitting: val loss rose 3 epochs in a row >= 3 (1 -> 1.1 -> 1.2 -> 1.3; +30% > 5%) "
         "while train loss 0.1 < val loss 1.3"),
        ([1.0, 1.01, 1.02, 1.03], [0.1] * 4, CLEAR, "val loss 1.03 <= 1.05 × its best 1"),  # +3 %: noise
        ([1.0, 1.1, 1.2, 1.3], [2.0] * 4, CLEAR, "val loss 1.3 not above train loss 2"),  # train above val: not overfitting
        ([1.0, 1.3, 1.02], [0.1] * 3, CLEAR, "Resolved: val loss 1.02 <= 1.05 × its best 1"),
    ],
)
def test_overfitting_rising_val_loss(val, train, status, fragment):
    expect("overfitting", Observation(epochs=epochs(train, val)), status, fragment)


def test_overfitting_skips_epochs_without_validation():
    history = epochs([0.1] * 7, [1.0, None, 1.1, None, 1.2, None, 1.3])
    expect("overfitting", Observation(epochs=history), FIRING, "rose 3 epochs in a row")


def gap_history(*accs: tuple[float, float], counts=(1400, 360)) -> Observation:
    """Epochs with these (train acc, val acc), measured over ``counts`` (train, val) predictions."""
    n = len(accs)
    return Observation(epochs=epochs([0.1] * n, [0.1] * n, [a[0] for a in accs], [a[1] for a in accs],
                                     counts=counts))


@pytest.mark.parametrize(
    ("obs", "status", "fragment"),
    [
        (gap_history((1.0, 0.88)), HOLDING, "Overfitting, not yet cleared: train acc 100% - val acc 88% = 12 points > 5"),
        (gap_history((1.0, 0.88), (1.0, 0.88)), HOLDING, ""),
        (gap_history((1.0, 0.88), (1.0, 0.88), (1.0, 0.88)), FIRING,
         "Overfitting: train acc 100% - val acc 88% = 12 points > 10 points in 3 epochs in a row, 7.01 standard "
         "errors on 360 val predictions"),
        (gap_history(*[(1.0, 0.88)] * 3, counts=(None, None)), FIRING, "in 3 epochs in a row; train error"),
        # a linear model at chance on two rings: 15 points, significant, but there is nothing to overfit
        (gap_history((0.57, 0.42), (0.57, 0.42), (0.57, 0.42)), HOLDING, ""),
        # a healthy small-batch SGD run: one noisy epoch at 10.5 points, gone the next
        (gap_history((0.90, 0.85), (0.955, 0.85)), HOLDING, ""),
        # early memorisation of a tiny train set that validation catches up with two epochs later
        (gap_history((0.878, 0.72), (0.878, 0.72), (0.856, 0.80), counts=(90, 359)), HOLDING, ""),
        (gap_history((0.90, 0.85), (0.955, 0.85), (0.96, 0.93)), CLEAR,
         "; train acc 96% - val acc 93% = 3 points <= 5 points."),
        # 14 points on 30 validation samples: 2.2 standard errors, noise
        (gap_history(*[(0.99, 0.85)] * 3, counts=(1400, 30)), HOLDING, ""),
        (gap_history(*[(0.99, 0.85)] * 3, counts=(1400, 360)), FIRING, "14 points > 10 points"),
    ],
)
def test_overfitting_accuracy_gap_needs_a_significant_lasting_gap_on_a_model_that_fits(obs, status, fragment):
    expect("overfitting", obs, status, fragment)


def test_overfitting_accuracy_gap_threshold_is_configurable():
    expect("overfitting", gap_history(*[(0.80, 0.50)] * 3), HOLDING, "", acc_gap=0.35)
    expect("overfitting", gap_history(*[(0.80, 0.50)] * 3), FIRING, "30 points > 25 points", acc_gap=0.25,
           max_error_ratio=1.0)
    expect("overfitting", gap_history(*[(0.80, 0.50)] * 2), FIRING, "in 2 epochs in a row", acc_gap=0.25,
           max_error_ratio=1.0, gap_patience=2)


# ------------------------------------------------------------------------------- underfitting

FLAT = [1.0, 0.9, 0.9, 0.9, 0.9]


@pytest.mark.parametrize(
    ("train", "val", "acc", "status", "fragment"),
    [
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], 0.4, FIRING,
         "Underfitting: train loss 0.9 and val loss 1 > 0.5 with no improvement over 1% for 3 epochs "
         "while accuracy 40% < 70%"),
        (FLAT[:-1], [1.1, 1.0, 1.0, 1.0], 0.4, CLEAR, "train loss improved"),  # flat for 2 epochs only
        (FLAT[:-2], [1.1, 1.0, 1.0], 0.4, UNCHECKED, ""),  # fewer than patience + 1 epochs
        ([1.0, 0.9, 0.89, 0.88, 0.87], [1.1, 1.0, 1.0, 1.0, 1.0], 0.4, CLEAR,
         "Resolved: train loss improved by more than 1% within the last 3 epochs"),
        (FLAT, [1.1, 1.0, 0.9, 0.8, 0.7], 0.4, CLEAR, "val loss improved"),
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], 0.70, CLEAR, "accuracy 70% >= 70%"),
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], 0.69, FIRING, "accuracy 69% < 70%"),
        ([0.6, 0.5, 0.5, 0.5, 0.5], [0.6, 0.5, 0.5, 0.5, 0.5], 0.4, CLEAR, "loss 0.5 <= 0.5"),
        (FLAT, None, 0.4, FIRING, "train loss 0.9 > 0.5"),  # no validation: train loss decides
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], None, FIRING, "no accuracy logged: judged on loss alone"),
    ],
)
def test_underfitting(train, val, acc, status, fragment):
    obs = Observation(epochs=epochs(train, val, val_acc=[acc] * len(train)))
    expect("underfitting", obs, status, fragment, patience=3)


@pytest.mark.parametrize(("n", "status"), [(10, UNCHECKED), (11, FIRING)])
def test_underfitting_default_patience_is_ten_epochs(n, status):
    expect("underfitting", Observation(epochs=epochs([2.0] * n, [2.0] * n, [0.3] * n, [0.3] * n)), status)


# ------------------------------------------------------------------------------------ plateau


@pytest.mark.parametrize(
    ("val", "extra", "settings", "status", "fragment"),
    [
        ([6, 5, 5], {}, {"patience": 3}, UNCHECKED, ""),
        ([6, 5, 5, 5], {}, {"patience": 3}, CLEAR, "val loss improved by more than 0.1% within the last 3 epochs"),
        ([6, 5, 5, 5, 5], {}, {"patience": 3}, FIRING,
         "Val loss plateaued: no improvement over 0.1% of best 5 for 3 epochs >= 3, nor train loss,"),
        ([6, 5, 4.9, 5, 5], {}, {"patience": 3}, CLEAR, ""),
        ([1.0, 0.9995, 0.9995, 0.9995], {}, {"patience": 3}, FIRING, "of best 1 for 3 epochs"),  # gains < min_delta
        ([1.0, 0.9995, 0.9995, 0.9995], {}, {"patience": 3, "min_delta": 0.0}, CLEAR, ""),
        ([6, 5, 5, 5, 5, 5], {}, {}, CLEAR, ""),
        ([6, 5, 5, 5, 5, 5, 5], {}, {}, FIRING, "for 5 epochs >= 5"),
        ([6, 5, 5, 5, 5], {"lr": [1e-3, 1e-3, 1e-3, 3e-4, 3e-4]}, {"patience": 3}, CLEAR, "learning rate changed"),
        ([6, 5, 5, 5, 5], {"lr": [1e-3] * 5}, {"patience": 3}, FIRING, "at a constant learning rate 0.001"),
        ([6, 5, 5, 5, 5], {"train": [2.0, 1.5, 1.2, 1.0, 0.8]}, {"patience": 3}, CLEAR, "train loss still improving"),
        ([6, 5, 5, 5, 5], {"train": [2.0, 0.1, 0.1, 0.1, 0.1]}, {"patience": 3}, CLEAR, "converged: train loss 0.1"),
    ],
)
def test_plateau(val, extra, settings, status, fragment):
    train = extra.get("train", [1.0] * len(val))
    obs = Observation(epochs=epochs(train, val, lr=extra.get("lr")))
    expect("plateau", obs, status, fragment, **settings)


def test_plateau_without_validation_watches_train_loss():
    expect("plateau", Observation(epochs=epochs([6, 5, 5, 5, 5])), FIRING, "Train loss plateaued", patience=3)


# ------------------------------------------------------------------------------------ stalled

STACK = '  File "/src/train.py", line 88, in main\n    loss = step()\n  File "/src/model.py", line 57, in forward\n'


@pytest.mark.parametrize(
    ("idle", "state", "status", "fragment"),
    [
        (299.0, "training", CLEAR, "Resolved: progress again: last step 299 s ago <= 300 s"),
        (300.0, "training", CLEAR, ""),
        (400.0, "training", FIRING, "Training stalled: no progress for 400 s > 300 s (last step 12); the training "
                                    "thread is in model.py:57 (forward), stack in the alert and the log"),
        (400.0, "paused", CLEAR, "the run is paused, not training"),
    ],
)
def test_stalled(idle, state, status, fragment):
    obs = Observation(step=12, now=1000.0, last_progress_time=1000.0 - idle, state=state, stack=STACK)
    expect("stalled", obs, status, fragment)


def test_stalled_message_names_the_users_frame_behind_a_library_wait():
    stack = STACK + '  File "/usr/lib/python3.11/threading.py", line 331, in wait\n    waiter.acquire()\n'
    obs = Observation(step=3, now=1000.0, last_progress_time=0.0, stack=stack)
    expect("stalled", obs, FIRING, "the training thread is in threading.py:331 (wait), called from model.py:57 (forward)")
    others = 'Thread "MainThread":\n' + stack + '\nThread "tbhealth-watchdog":\n  File "/src/w.py", line 9, in tick\n'
    expect("stalled", Observation(step=3, now=1000.0, last_progress_time=0.0, stack=others), FIRING,
           "called from model.py:57 (forward), stack")


def test_stalled_finding_carries_the_stack():
    obs = Observation(step=3, now=1000.0, last_progress_time=0.0, stack=STACK)
    [f] = evaluate(obs, HealthConfig())
    assert f.rule == "stalled" and f.stack == STACK


# ------------------------------------------------------------------------------------ engine


def test_rules_not_checked_without_their_inputs():
    assert check(Observation(), HealthConfig()) == ([], set())


def test_disabled_rule_neither_fires_nor_counts_as_checked():
    obs = Observation(layer_grad_norms={"a": 0.0}, dead_fraction={"b": 1.0})
    findings, checked = check(obs, HealthConfig(vanishing_gradients={"enabled": False}))
    assert [f.rule for f in findings] == ["dead_neurons"] and checked == {"dead_neurons"}
    assert check(obs, HealthConfig(enabled=False)) == ([], set())


def test_findings_come_in_priority_order():
    obs = Observation(
        step_losses=steps(1, 1, 1, 1, 1, 60),
        initial_loss=1.0,
        dead_fraction={"r": 1.0},
        gpu_memory_used=99,
        gpu_memory_total=100,
    )
    assert [f.rule for f in evaluate(obs, HealthConfig())] == ["divergence", "memory", "dead_neurons", "loss_spike"]


def test_rule_table_matches_rule_ids_and_severities():
    assert tuple(RULES) == RULE_IDS
    cfg = HealthConfig()
    # every rule id has a settings block of its own kind, named after it (divergence -> DivergenceSettings)
    kinds = {r: type(cfg.rule(r)).__name__ for r in RULE_IDS}
    assert kinds == {r: r.title().replace("_", "") + "Settings" for r in RULE_IDS}
    assert all(isinstance(cfg.rule(r), RuleSettings) for r in RULE_IDS)


# ----------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"divergance": {}}, ["unknown key(s) divergance", "allowed: enabled, every_steps"]),
        ({"divergence": {"factr": 3}}, ["unknown key(s) factr", "allowed: enabled, action, factor"]),
        ({"divergence": {"action": "halt"}}, ["divergence.action", "'warn', 'pause' or 'stop'"]),
        ({"overfitting": {"acc_gap": 10}}, ["overfitting.acc_gap", "fraction in (0, 1]", "0.1 for 10 %"]),
        ({"memory": {"max_fraction": 0}}, ["memory.max_fraction", "fraction in (0, 1]"]),
        ({"every_steps": 0}, ["every_steps", "greater than or equal to 1"]),
        ({"divergence": {"factor": 1.0}}, ["divergence.factor", "greater than 1"]),
        ({"underfitting": {"patience": 0}}, ["underfitting.patience", "greater than or equal to 1"]),
        ({"vanishing_gradients": {"min_norm": -1}}, ["vanishing_gradients.min_norm", "greater than 0"]),
        ({"divergence": {"factor": 4, "resolve_factor": 6}},
         ["divergence", "resolve_factor (6.0) must be at most factor (4.0)", "resolves on the healthy side"]),
        ({"vanishing_gradients": {"resolve_norm": 1e-9}}, ["resolve_norm (1e-09) must be at least min_norm (1e-07)"]),
        ({"overfitting": {"resolve_gap": 0.2}}, ["resolve_gap (0.2) must be at most acc_gap (0.1)"]),
        ({"dead_neurons": {"resolve_fraction": 0.6}}, ["resolve_fraction (0.6) must be at most max_fraction (0.5)"]),
    ],
)
def test_bad_settings_fail_at_construction_naming_what_is_allowed(raw, fragments):
    with pytest.raises(ValidationError) as info:
        HealthConfig(**raw)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text


def test_settings_defaults_are_the_design_numbers():
    cfg = HealthConfig()
    assert cfg.divergence.factor == 10 and cfg.overfitting.patience == 3 and cfg.overfitting.acc_gap == 0.10
    u = cfg.underfitting
    assert (u.loss_threshold, u.patience, u.max_acc) == (0.5, 10, 0.70)
    assert cfg.dead_neurons.max_fraction == 0.5 and cfg.vanishing_gradients.min_norm == 1e-7
    assert cfg.memory.max_fraction == 0.95
    assert {cfg.rule(r).action for r in RULE_IDS} == {"warn"}
    assert {r for r in RULE_IDS if not cfg.rule(r).enabled} == {"plateau"}  # converged runs end flat: opt in
    with pytest.raises(KeyError, match="allowed: divergence"):
        cfg.rule("nope")


def test_resolve_thresholds_default_to_the_healthy_side_of_the_firing_ones():
    cfg = HealthConfig()
    assert (cfg.divergence.resolve_factor, cfg.memory.resolve_fraction, cfg.dead_neurons.resolve_fraction) == (5, 0.9, 0.4)
    assert (cfg.vanishing_gradients.resolve_norm, cfg.overfitting.resolve_gap) == (1e-6, 0.05)
    assert (cfg.exploding_gradients.resolve_norm, cfg.exploding_gradients.resolve_ratio) == (500, 5)
    moved = HealthConfig(divergence={"factor": 4}, dead_neurons={"max_fraction": 0.9}, loss_spike={"factor": 1.5})
    assert (moved.divergence.resolve_factor, moved.dead_neurons.resolve_fraction) == (2, 0.8)
    assert moved.loss_spike.resolve_factor == 1.0  # never below the median itself
    assert HealthConfig(divergence={"factor": 4, "resolve_factor": 4}).divergence.resolve_factor == 4  # no hysteresis


def test_every_setting_is_described():
    cfg = HealthConfig()
    for model in [cfg, *(cfg.rule(r) for r in RULE_IDS)]:
        for name, field in type(model).model_fields.items():
            assert field.description, f"{type(model).__name__}.{name} has no description"


def test_engine_imports_no_torch_and_exports_what_is_documented():
    import subprocess
    import sys

    # every public name resolved: the whole engine loads without torch
    code = ("import sys, tbhealth.health as h; [getattr(h, n) for n in h.__all__]; "
            "print('torch' in sys.modules, sorted(h.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")
    for name in ("AlertTracker", "HealthConfig", "Observation", "RuleId", "check", "check_all", "health_score"):
        assert f"'{name}'" in out
