"""Health rules on literal histories: below, at and above each threshold, verdict and message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tbhealth.health import RULE_IDS, RULES, EpochMetrics, HealthConfig, Observation, check, evaluate
from tbhealth.health.settings import RuleSettings


def verdict(rule: str, obs: Observation, **settings) -> tuple[list[str], bool]:
    """Messages of ``rule``'s findings and whether the rule was checked at all."""
    findings, checked = check(obs, HealthConfig(**{rule: settings}))
    return [f.message for f in findings if f.rule == rule], rule in checked


def steps(*losses: float) -> list[tuple[int, float]]:
    return [(i + 1, v) for i, v in enumerate(losses)]


def epochs(train, val=None, train_acc=None, val_acc=None) -> list[EpochMetrics]:
    n = len(train)
    val, train_acc, val_acc = (x if x is not None else [None] * n for x in (val, train_acc, val_acc))
    return [EpochMetrics(i, t, v, ta, va) for i, (t, v, ta, va) in enumerate(zip(train, val, train_acc, val_acc))]


def expect(messages: list[str], fragment: str | None) -> None:
    if fragment is None:
        assert messages == []
    else:
        assert len(messages) == 1 and fragment in messages[0], messages


# --------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize(
    ("obs", "settings", "fragment"),
    [
        (Observation(step_losses=steps(2.31, 23.0), initial_loss=2.31), {}, None),
        (Observation(step_losses=steps(2.31, 23.1), initial_loss=2.31), {}, None),
        (
            Observation(step_losses=steps(2.31, 45.2), initial_loss=2.31),
            {},
            "Loss diverged: step 2 loss 45.2 > 10 × initial loss 2.31 (23.1). Consider lowering the learning rate",
        ),
        (Observation(step_losses=steps(1.0, 4.0), initial_loss=1.0), {"factor": 3.0}, "4 > 3 × initial loss 1 (3)"),
        (Observation(step_losses=steps(2.0, float("nan")), initial_loss=2.0), {}, "non-finite (NaN/Inf) step 2 loss"),
        (Observation(nonfinite="loss"), {}, "non-finite (NaN/Inf) loss"),
        (Observation(nonfinite="gradients"), {}, "non-finite (NaN/Inf) gradients"),
        (Observation(nonfinite="gradients"), {"nonfinite_gradients": False}, None),
        (Observation(epochs=epochs([1.0], [float("inf")])), {}, "non-finite (NaN/Inf) val loss"),
        (Observation(epochs=epochs([30.0]), initial_loss=2.0), {}, "train loss 30 > 10 × initial loss 2 (20)"),
        (Observation(step_losses=steps(-1.0, 50.0), initial_loss=-1.0), {}, None),  # ratio needs a positive start
    ],
)
def test_divergence(obs, settings, fragment):
    messages, checked = verdict("divergence", obs, **settings)
    assert checked
    expect(messages, fragment)


def test_divergence_message_states_the_action_and_is_critical():
    cfg = HealthConfig(divergence={"action": "pause"})
    [finding] = evaluate(Observation(step_losses=steps(1.0, 50.0), initial_loss=1.0), cfg)
    assert finding.severity == "critical" and finding.action == "pause"
    assert finding.message.endswith("Pausing training (health.divergence.action: pause).")
    assert (finding.value, finding.threshold, finding.layer) == (50.0, 10.0, None)


# ------------------------------------------------------------------------------------- memory

GIB = 2**30


@pytest.mark.parametrize(
    ("used", "fragment"),
    [(94, None), (95, None), (96, "GPU memory nearly full: 96.0 of 100.0 GiB used (96% > 95%)")],
)
def test_memory(used, fragment):
    obs = Observation(gpu_memory_used=used * GIB, gpu_memory_total=100 * GIB)
    messages, checked = verdict("memory", obs)
    assert checked
    expect(messages, fragment)


def test_memory_not_checked_without_gpu():
    assert verdict("memory", Observation()) == ([], False)


# --------------------------------------------------------------------------- gradient norms


@pytest.mark.parametrize(
    ("norm", "history", "settings", "fragment"),
    [
        (999.0, [], {}, None),
        (1000.0, [], {}, None),
        (2300.0, [], {}, "Exploding gradients: global grad norm 2.3e+03 > 1e+03"),
        (9.9, [1, 1, 1, 1, 1], {}, None),
        (10.0, [1, 1, 1, 1, 1], {}, None),
        (11.0, [1, 1, 1, 1, 1], {}, "global grad norm 11 > 10 × recent median 1 (10)"),
        (11.0, [1, 1, 1, 1], {}, None),  # fewer than min_history earlier samples
        (11.0, [1, 1, 1, 1, 1], {"ratio": None}, None),
        (float("inf"), [1, 1, 1, 1, 1], {}, None),  # non-finite is divergence's finding
    ],
)
def test_exploding_gradients(norm, history, settings, fragment):
    obs = Observation(global_grad_norm=norm, grad_norm_history=history)
    messages, checked = verdict("exploding_gradients", obs, **settings)
    assert checked
    expect(messages, fragment)


@pytest.mark.parametrize(
    ("first", "fragment"),
    [
        (1.1e-7, None),
        (1e-7, None),
        (
            3.2e-9,
            "Layer 'net.0' has vanishing gradients: grad norm 3.2e-09 < 1e-07. Consider ReLU/residual connections",
        ),
    ],
)
def test_vanishing_gradients_per_layer(first, fragment):
    obs = Observation(layer_grad_norms={"net.0": first, "net.2": 0.5}, global_grad_norm=0.5)
    messages, checked = verdict("vanishing_gradients", obs)
    assert checked
    expect(messages, fragment)


def test_vanishing_gradients_findings_name_layer_and_rank():
    [f] = evaluate(Observation(layer_grad_norms={"net.0": 0.0}, rank=2), HealthConfig())
    assert (f.layer, f.key, f.rank) == ("net.0", "vanishing_gradients:net.0@2", 2)
    assert f.message.startswith("[rank 2] Layer 'net.0'")


@pytest.mark.parametrize(
    ("fraction", "fragment"),
    [(0.4, None), (0.5, None), (0.62, "Layer 'net.1' has dead units: 62% output 0 for every sampled input > 50%")],
)
def test_dead_neurons(fraction, fragment):
    messages, checked = verdict("dead_neurons", Observation(dead_fraction={"net.1": fraction, "net.3": 0.0}))
    assert checked
    expect(messages, fragment)


# ------------------------------------------------------------------------------- loss spikes


@pytest.mark.parametrize(
    ("history", "fragment"),
    [
        ([1, 1, 1, 1, 1, 4.9], None),
        ([1, 1, 1, 1, 1, 5.0], None),
        ([1, 1, 1, 1, 1, 5.1], "Loss spike: step 6 loss 5.1 > 5 × recent median 1 (5)"),
        ([1, 1, 1, 1, 5.1], None),  # fewer than min_history earlier losses
        ([9, 9, 1, 1, 1, 1, 1, 5.1], "recent median 1 (5)"),  # median, not mean, of the recent losses
    ],
)
def test_loss_spike(history, fragment):
    messages, checked = verdict("loss_spike", Observation(step_losses=steps(*history)))
    assert checked
    expect(messages, fragment)


def test_loss_spike_window_limits_history():
    history = steps(*([100.0] * 30 + [1.0] * 5 + [6.0]))
    messages, _ = verdict("loss_spike", Observation(step_losses=history), window=5)
    expect(messages, "recent median 1 (5)")


# -------------------------------------------------------------------------------- epoch rules


@pytest.mark.parametrize(
    ("val", "train", "fragment"),
    [
        ([1.0, 1.1, 1.2], [0.1] * 3, None),
        ([1.3, 1.0, 1.1, 1.2, 1.2], [0.1] * 5, None),
        (
            [1.0, 1.1, 1.2, 1.3],
            [0.1] * 4,
            "Overfitting: val loss rose 3 epochs in a row >= 3 (1 -> 1.1 -> 1.2 -> 1.3) "
            "while train loss 0.1 < val loss 1.3",
        ),
        ([1.0, 1.1, 1.2, 1.3], [2.0] * 4, None),  # train loss above val loss: not overfitting
    ],
)
def test_overfitting_rising_val_loss(val, train, fragment):
    messages, checked = verdict("overfitting", Observation(epochs=epochs(train, val)))
    assert checked
    expect(messages, fragment)


def test_overfitting_skips_epochs_without_validation():
    history = epochs([0.1] * 7, [1.0, None, 1.1, None, 1.2, None, 1.3])
    messages, _ = verdict("overfitting", Observation(epochs=history))
    expect(messages, "rose 3 epochs in a row")


@pytest.mark.parametrize(
    ("train_acc", "val_acc", "fragment"),
    [
        (0.70, 0.50, None),
        (0.75, 0.50, None),
        (0.80, 0.50, "train acc 80% - val acc 50% = 30 points > 25 points"),
    ],
)
def test_overfitting_accuracy_gap(train_acc, val_acc, fragment):
    obs = Observation(epochs=epochs([0.3], [0.3], [train_acc], [val_acc]))
    messages, _ = verdict("overfitting", obs, acc_gap=0.25)
    expect(messages, fragment)


def test_overfitting_default_gap_is_ten_points():
    obs = Observation(epochs=epochs([0.3], [0.3], [0.96], [0.85]))
    expect(verdict("overfitting", obs)[0], "train acc 96% - val acc 85% = 11 points > 10 points")


FLAT = [1.0, 0.9, 0.9, 0.9, 0.9]


@pytest.mark.parametrize(
    ("train", "val", "acc", "fragment"),
    [
        (
            FLAT,
            [1.1, 1.0, 1.0, 1.0, 1.0],
            0.4,
            "Underfitting: train loss 0.9 and val loss 1 > 0.5 with no improvement over 1% for 3 epochs "
            "while accuracy 40% < 70%",
        ),
        (FLAT[:-1], [1.1, 1.0, 1.0, 1.0], 0.4, None),  # plateau of 2 epochs only
        ([1.0, 0.9, 0.89, 0.88, 0.87], [1.1, 1.0, 1.0, 1.0, 1.0], 0.4, None),  # train still improving > 1 %
        (FLAT, [1.1, 1.0, 0.9, 0.8, 0.7], 0.4, None),  # val still improving
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], 0.70, None),
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], 0.69, "accuracy 69% < 70%"),
        ([0.6, 0.5, 0.5, 0.5, 0.5], [0.6, 0.5, 0.5, 0.5, 0.5], 0.4, None),  # at the loss threshold
        (FLAT, None, 0.4, "train loss 0.9 > 0.5"),  # no validation: train loss decides
        (FLAT, [1.1, 1.0, 1.0, 1.0, 1.0], None, "no accuracy logged: judged on loss alone"),
    ],
)
def test_underfitting(train, val, acc, fragment):
    obs = Observation(epochs=epochs(train, val, val_acc=[acc] * len(train)))
    messages, checked = verdict("underfitting", obs, patience=3)
    assert checked
    expect(messages, fragment)


@pytest.mark.parametrize(("n", "fires"), [(10, False), (11, True)])
def test_underfitting_default_patience_is_ten_epochs(n, fires):
    obs = Observation(epochs=epochs([2.0] * n, [2.0] * n, [0.3] * n, [0.3] * n))
    assert bool(verdict("underfitting", obs)[0]) is fires


@pytest.mark.parametrize(
    ("val", "settings", "fragment"),
    [
        ([6, 5, 5, 5], {"patience": 3}, None),
        ([6, 5, 5, 5, 5], {"patience": 3}, "Val loss plateaued: no improvement over 0.1% of best 5 for 3 epochs >= 3"),
        ([6, 5, 4.9, 5, 5], {"patience": 3}, None),
        ([1.0, 0.9995, 0.9995, 0.9995], {"patience": 3}, "of best 1 for 3 epochs"),  # gains < min_delta
        ([1.0, 0.9995, 0.9995, 0.9995], {"patience": 3, "min_delta": 0.0}, None),
        ([6, 5, 5, 5, 5, 5], {}, None),
        ([6, 5, 5, 5, 5, 5, 5], {}, "for 5 epochs >= 5"),
    ],
)
def test_plateau(val, settings, fragment):
    messages, checked = verdict("plateau", Observation(epochs=epochs([1.0] * len(val), val)), **settings)
    assert checked
    expect(messages, fragment)


def test_plateau_without_validation_watches_train_loss():
    expect(verdict("plateau", Observation(epochs=epochs([6, 5, 5, 5, 5])), patience=3)[0], "Train loss plateaued")


# ------------------------------------------------------------------------------------ stalled


@pytest.mark.parametrize(
    ("idle", "state", "fragment"),
    [
        (299.0, "training", None),
        (300.0, "training", None),
        (400.0, "training", "Training stalled: no progress for 400 s > 300 s (last step 12)"),
        (400.0, "paused", None),
    ],
)
def test_stalled(idle, state, fragment):
    obs = Observation(step=12, now=1000.0, last_progress_time=1000.0 - idle, state=state)
    messages, checked = verdict("stalled", obs)
    assert checked
    expect(messages, fragment)


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
    with pytest.raises(KeyError, match="allowed: divergence"):
        cfg.rule("nope")


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
