"""The trainer's step without AMP is the textbook step: no GradScaler in the way, the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from tbhealth.training.config import config_from_dict
from tbhealth.training.trainer import Trainer


@pytest.mark.parametrize(("accumulate", "clip"), [(1, None), (2, 0.05)])
def test_a_step_without_amp_matches_a_hand_written_step(tmp_path, accumulate, clip):
    cfg = config_from_dict({"epochs": 1, "device": "cpu", "accumulate_steps": accumulate, "grad_clip": clip,
                            "model": {"kwargs": {"dropout": 0.0}}, "optimizer": {"name": "SGD", "lr": 0.1}})
    trainer = Trainer(cfg, tmp_path / "run", verbose=False)
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = trainer.bundle.train.tensors[0][:64], trainer.bundle.train.tensors[1][:64]
    batches = [(x[i::accumulate], y[i::accumulate]) for i in range(accumulate)]

    for bx, by in batches:
        trainer.forward_backward(bx, by, scale=1.0 / accumulate)
        (torch.nn.functional.cross_entropy(model(bx), by) / accumulate).backward()
    norm = trainer.optimizer_step()
    expected_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
    optimizer.step()

    assert not trainer.scaler.is_enabled()
    assert (norm is None) == (expected_norm is None)
    if clip:
        torch.testing.assert_close(norm, expected_norm)
    for mine, ref in zip(trainer.model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, ref)
