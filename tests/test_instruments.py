"""Instruments on small real models: dead units, per-layer gradient norms, flags, hook hygiene."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tbhealth.health import HealthConfig, Observation, evaluate
from tbhealth.instruments import Instruments


class Net(nn.Module):
    """Layer names as users see them: 'net.0', 'net.1', ..."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def relu_net(dead_units: int = 0) -> Net:
    torch.manual_seed(0)
    model = Net(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model.net[0].bias[:dead_units] = -100.0  # pre-activation ≈ -100 for any normal input: dead
    return model


def sampled_step(model: nn.Module, inst: Instruments, x: torch.Tensor) -> torch.Tensor:
    inst.arm()
    loss = model(x).pow(2).mean()
    inst.disarm()
    loss.backward()
    inst.capture_gradients()
    return loss


def test_dead_layer_is_detected_and_named():
    model = relu_net(dead_units=12)
    inst = Instruments(model)
    sampled_step(model, inst, torch.randn(64, 8))
    sample = inst.read()
    assert sample["dead_fraction"] == {"net.1": 0.75}
    assert 0.75 <= sample["zero_fraction"]["net.1"] < 1.0
    [finding] = evaluate(Observation(dead_fraction=sample["dead_fraction"]), HealthConfig())
    assert finding.rule == "dead_neurons" and finding.layer == "net.1" and "75% output 0" in finding.message


def test_healthy_relu_layer_has_no_dead_units():
    model = relu_net()
    inst = Instruments(model)
    sampled_step(model, inst, torch.randn(256, 8))
    sample = inst.read()
    assert sample["dead_fraction"]["net.1"] <= 0.125
    assert 0.2 < sample["zero_fraction"]["net.1"] < 0.8  # about half of ReLU outputs are 0


def test_a_unit_alive_in_any_sampled_batch_is_not_dead():
    model = Net(nn.ReLU())
    inst = Instruments(model)
    inst.arm()
    model(torch.tensor([[1.0, -1.0, -1.0, -1.0]]))
    model(torch.tensor([[-1.0, 1.0, -1.0, -1.0]]))
    inst.disarm()
    sample = inst.read()
    assert sample["dead_fraction"] == {"net.0": 0.5} and sample["zero_fraction"] == {"net.0": 0.75}


def test_conv_units_are_channels():
    torch.manual_seed(0)
    model = Net(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        model.net[0].bias[:3] = -100.0
    inst = Instruments(model)
    inst.arm()
    model(torch.randn(2, 3, 8, 8))
    inst.disarm()
    assert inst.read()["dead_fraction"] == {"net.1": 0.75}


def test_per_layer_vanishing_in_a_deep_sigmoid_net_while_global_norm_is_fine():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(16):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = Net(*layers, nn.Linear(32, 1))
    inst = Instruments(model)
    nn.functional.mse_loss(model(torch.randn(64, 32)), torch.randn(64, 1)).backward()
    inst.capture_gradients()
    sample = inst.read()
    norms = sample["layer_grad_norms"]
    assert list(norms) == [f"net.{i}" for i in range(0, 33, 2)]
    assert norms["net.0"] < 1e-7 and norms["net.32"] > 1e-2 and sample["global_grad_norm"] > 1e-2
    reference = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert sample["global_grad_norm"] == pytest.approx(reference.item(), rel=1e-5)
    w, b = model.net[0].weight.grad, model.net[0].bias.grad
    assert norms["net.0"] == pytest.approx(torch.cat([w.flatten(), b]).norm().item(), rel=1e-5)
    obs = Observation(layer_grad_norms=norms, global_grad_norm=sample["global_grad_norm"])
    findings = evaluate(obs, HealthConfig())
    vanished = [f.layer for f in findings if f.rule == "vanishing_gradients"]
    assert "net.0" in vanished and "net.32" not in vanished
    assert not [f for f in findings if f.rule == "exploding_gradients"]


def test_frozen_and_unused_layers_have_no_gradient_norm():
    model = Net(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model.net[0].requires_grad_(False)
    inst = Instruments(model)
    model.net[1](torch.randn(2, 4)).sum().backward()  # net.2 unused this step
    inst.capture_gradients()
    assert list(inst.read()["layer_grad_norms"]) == ["net.1"]


def test_sparse_gradients_are_measured():
    model = Net(nn.Embedding(10, 3, sparse=True))
    inst = Instruments(model)
    model(torch.tensor([1, 2, 2])).sum().backward()
    inst.capture_gradients()
    expected = model.net[0].weight.grad.to_dense().norm().item()
    assert inst.read()["layer_grad_norms"]["net.0"] == pytest.approx(expected, rel=1e-6)


def test_disarm_removes_every_hook():
    model = relu_net()
    inst = Instruments(model)
    inst.arm()
    inst.arm()  # idempotent: never two hooks on one module
    assert sum(len(m._forward_hooks) for m in model.modules()) == 1 and inst.armed
    inst.disarm()
    assert all(not m._forward_hooks for m in model.modules()) and not inst.armed
    model(torch.randn(4, 8))  # an unsampled forward records nothing
    assert inst.read()["dead_fraction"] is None


def test_no_activation_tensor_is_retained():
    model = relu_net()
    seen: list[weakref.ref] = []
    model.net[1].register_forward_hook(lambda m, i, out: seen.append(weakref.ref(out)))
    inst = Instruments(model)
    loss = sampled_step(model, inst, torch.randn(512, 8))
    del loss
    gc.collect()
    assert seen and seen[0]() is None  # freed: the instruments kept only reductions
    assert inst.read()["dead_fraction"] is not None


def test_nonfinite_gradients_are_flagged():
    model = relu_net()
    inst = Instruments(model)
    sampled_step(model, inst, torch.randn(8, 8))
    model.net[2].weight.grad[0, 0] = float("inf")
    inst.capture_gradients()
    assert inst.read()["nonfinite"] == "gradients"


def test_read_without_measurements_reports_nothing_measured():
    sample = Instruments(relu_net()).read()
    assert sample == {
        "nonfinite": None,
        "layer_grad_norms": None,
        "global_grad_norm": None,
        "zero_fraction": None,
        "dead_fraction": None,
    }


def test_wrapped_models_keep_user_layer_names_and_custom_activations_are_covered():
    class Block(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    model = Net(nn.Linear(4, 4), Block())
    compiled = torch.compile(model, backend="eager")
    inst = Instruments(compiled, HealthConfig(activation_modules=["Block"]))
    assert [name for name, _ in inst.activation_layers] == ["net.1"]
    assert [name for name, _ in inst.param_layers] == ["net.0"]


def test_ddp_wrapper_is_unwrapped():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = relu_net(dead_units=4)
        ddp = nn.parallel.DistributedDataParallel(model)
        inst = Instruments(ddp)
        sampled_step(ddp, inst, torch.randn(16, 8))
        sample = inst.read()
        assert sample["dead_fraction"] == {"net.1": 0.25} and list(sample["layer_grad_norms"]) == ["net.0", "net.2"]
    finally:
        dist.destroy_process_group()


def test_autocast_bf16_step_is_measured():
    model = relu_net(dead_units=8)
    inst = Instruments(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inst.arm()
        loss = model(torch.randn(32, 8)).float().pow(2).mean()
        inst.disarm()
    loss.backward()
    inst.capture_gradients()
    sample = inst.read()
    assert sample["dead_fraction"] == {"net.1": 0.5} and sample["nonfinite"] is None
    assert sample["global_grad_norm"] > 0
