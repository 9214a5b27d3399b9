"""Alert lifecycle (fire once, update, resolve, re-fire) and the health score."""

from __future__ import annotations

import json

import pytest

from tbhealth.health import AlertTracker, HealthConfig, Observation, check, check_all, health_score

ALERT_KEYS = {"id", "rule", "severity", "message", "epoch", "step", "time", "layer", "value", "threshold", "resolved"}


def vanishing(norm: float | None, rank: int | None = None):
    """Findings and checked rules of a round in which layer 'net.0' has gradient norm ``norm``."""
    obs = Observation(layer_grad_norms={} if norm is None else {"net.0": norm, "net.2": 1.0}, rank=rank)
    return check(obs, HealthConfig())


def events_of(tracker: AlertTracker, norm: float | None, now: float, step: int = 0, rank: int | None = None):
    """The AlertEvents of one round in which layer 'net.0' has gradient norm ``norm``."""
    findings, checked = vanishing(norm, rank)
    return tracker.update(findings, epoch=1, step=step, now=now, checked=checked)


def records(events) -> list[dict]:
    return [e.record for e in events]


def round_(tracker: AlertTracker, norm: float | None, now: float, step: int = 0, rank: int | None = None):
    """The records of that round (what is appended to the run's alerts file)."""
    return records(events_of(tracker, norm, now, step, rank))


def test_alert_fires_once_with_the_documented_shape():
    tracker = AlertTracker()
    [fired] = events_of(tracker, 1e-9, now=100.0, step=40)
    assert fired.starts_episode  # the event a pause/stop action acts on
    event = fired.record
    assert set(event) == ALERT_KEYS | {"action", "layers"}
    assert event["layers"] == [{"layer": "net.0", "value": 1e-9}]  # every affected layer, worst first
    assert event["rule"] == "vanishing_gradients" and event["layer"] == "net.0" and event["severity"] == "warning"
    assert (event["epoch"], event["step"], event["time"]) == (1, 40, 100.0)
    assert (event["resolved"], event["action"]) == (False, "warn")
    assert (event["value"], event["threshold"]) == (1e-9, 1e-7)
    assert "Layer 'net.0' has vanishing gradients" in event["message"]
    json.dumps(event, allow_nan=False)  # strict JSON: what the CLI and the plugin read
    assert round_(tracker, 1e-9, now=101.0) == []  # identical round: nothing to record
    [update] = events_of(tracker, 5e-9, now=102.0)
    assert update.record["id"] == event["id"] and not update.starts_episode  # not acted on again
    [resolved] = events_of(tracker, 0.5, now=103.0)
    assert resolved.record["resolved"] and not resolved.starts_episode
    [again] = events_of(tracker, 1e-9, now=104.0)
    assert again.starts_episode and again.record["id"] != event["id"]  # a new episode


def test_alert_updates_keep_the_id_and_are_throttled():
    tracker = AlertTracker(rel_change=0.10, refresh_s=60.0)
    [fired] = round_(tracker, 1e-9, now=0.0)
    assert round_(tracker, 1.05e-9, now=10.0) == []  # small drift: not worth a record yet
    assert tracker.active()[0]["value"] == 1.05e-9  # ...but the live view is current
    [update] = round_(tracker, 5e-9, now=11.0)  # moved more than 10 %: recorded at once
    assert update["id"] == fired["id"] and update["value"] == 5e-9 and not update["resolved"]
    assert "5e-09" in update["message"] and update["time"] == 0.0  # time: when the episode began
    assert round_(tracker, 5.2e-9, now=30.0) == []
    [refresh] = round_(tracker, 5.3e-9, now=71.0)  # small drift, but refresh_s passed
    assert refresh["id"] == fired["id"] and refresh["value"] == 5.3e-9
    assert round_(tracker, 5.3e-9, now=500.0) == []  # unchanged: never re-recorded


def test_alert_resolves_only_when_its_rule_was_checked():
    tracker = AlertTracker()
    [fired] = round_(tracker, 1e-9, now=0.0)
    assert tracker.update([], epoch=1, step=5, now=1.0, checked={"dead_neurons"}) == []  # not checked: stays open
    assert tracker.update([], epoch=1, step=5, now=1.0, checked=set()) == []
    [resolved] = round_(tracker, 0.5, now=2.0, step=9)
    assert resolved["id"] == fired["id"] and resolved["resolved"] is True
    # when it cleared, for the tab's resolution marker; when it began stays as it was
    assert (resolved["resolved_time"], resolved["resolved_step"], resolved["time"]) == (2.0, 9, 0.0)
    assert tracker.active() == []
    assert round_(tracker, 0.5, now=3.0) == []


def test_refiring_after_resolution_is_a_new_episode():
    tracker = AlertTracker()
    [first] = round_(tracker, 1e-9, now=0.0)
    round_(tracker, 0.5, now=1.0)
    [second] = round_(tracker, 1e-9, now=2.0, step=99)
    assert second["id"] != first["id"] and second["step"] == 99 and not second["resolved"]


def test_ranks_are_separate_episodes_and_layers_are_one():
    tracker = AlertTracker()
    ranks = [Observation(layer_grad_norms={"net.0": 1e-9}, rank=r) for r in (0, 1)]
    findings, checked = check_all(ranks, HealthConfig())
    a, b = records(tracker.update(findings, epoch=0, step=0, now=0.0, checked=checked))
    assert a["id"] != b["id"] and (a["rank"], b["rank"]) == (0, 1) and "[rank 1]" in b["message"]
    ranks[1] = Observation(layer_grad_norms={"net.0": 1.0}, rank=1)
    findings, checked = check_all(ranks, HealthConfig())
    [resolved] = records(tracker.update(findings, epoch=0, step=1, now=1.0, checked=checked))
    assert resolved["id"] == b["id"] and resolved["resolved"]
    findings, checked = check(Observation(layer_grad_norms={"x": 1e-8, "y": 1e-9, "z": 0.5}), HealthConfig())
    [event] = records(tracker.update(findings, epoch=0, step=0, now=0.0, checked=checked))
    assert event["layer"] == "y" and event["layers"] == [{"layer": "y", "value": 1e-9}, {"layer": "x", "value": 1e-8}]
    assert "rank" not in event


def test_a_holding_value_keeps_an_episode_open_but_never_opens_one():
    tracker = AlertTracker()
    assert round_(tracker, 5e-7, now=0.0) == []  # between 1e-7 and 1e-6: nothing was open, nothing opens
    [fired] = round_(tracker, 1e-9, now=1.0)
    assert round_(tracker, 5e-7, now=2.0)[0]["message"].startswith("Layer 'net.0' has vanishing gradients, not yet")
    assert [a["id"] for a in tracker.active()] == [fired["id"]]  # hovering near 1e-7 is one episode
    [resolved] = round_(tracker, 2e-6, now=3.0)
    assert resolved["resolved"] and resolved["id"] == fired["id"]
    assert resolved["message"] == ("Resolved: no layer has vanishing gradients: every layer >= 1e-06 "
                                   "(nearest: 'net.0' 2e-06).")


def test_a_plain_set_of_checked_rules_still_resolves_by_rule():
    tracker = AlertTracker()
    [fired] = round_(tracker, 1e-9, now=0.0)
    [resolved] = records(tracker.update([], epoch=1, step=2, now=1.0, checked={"vanishing_gradients"}))
    assert resolved["id"] == fired["id"] and resolved["resolved"]


def test_nonfinite_values_are_recorded_as_null():
    findings, checked = check(Observation(nonfinite="loss"), HealthConfig(divergence={"action": "stop"}))
    [event] = records(AlertTracker().update(findings, epoch=0, step=3, now=0.0, checked=checked))
    assert event["value"] is None and event["severity"] == "critical" and event["action"] == "stop"
    json.dumps(event, allow_nan=False)


def test_resumed_tracker_continues_open_episodes():
    first = AlertTracker()
    [fired] = round_(first, 1e-9, now=0.0)
    resumed = AlertTracker(open_alerts=[fired, {**fired, "id": "old", "resolved": True}])
    assert [a["id"] for a in resumed.active()] == [fired["id"]]
    assert round_(resumed, 1e-9, now=1.0) == []
    [moved] = events_of(resumed, 5e-9, now=1.5)
    assert moved.record["id"] == fired["id"] and not moved.starts_episode  # a resumed run is not re-paused
    [resolved] = round_(resumed, 0.5, now=2.0)
    assert resolved["id"] == fired["id"] and resolved["resolved"]


def test_ids_are_unique_across_trackers():
    ids = {round_(AlertTracker(), 1e-9, now=0.0)[0]["id"] for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("vanishing_gradients-") for i in ids)


@pytest.mark.parametrize(
    ("severities", "warnings", "errors", "score"),
    [
        ([], 0, 0, 100),
        (["warning"], 0, 0, 85),
        (["critical"], 0, 0, 60),
        (["critical", "warning"], 0, 0, 45),
        ([], 3, 0, 94),
        ([], 100, 0, 80),  # logged warnings capped at 20 points
        ([], 0, 2, 90),
        ([], 0, 100, 75),  # logged errors capped at 25 points
        (["critical", "critical", "critical"], 0, 0, 0),  # floor
        (["warning"], 5, 1, 70),
    ],
)
def test_health_score(severities, warnings, errors, score):
    alerts = [{"severity": s, "resolved": False} for s in severities]
    assert health_score(alerts, warnings, errors) == score


def test_health_score_ignores_resolved_alerts():
    assert health_score([{"severity": "critical", "resolved": True}]) == 100
