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
        "reported_grad_norm": None,
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


# --------------------------------------------------------------------------- coverage


class NewGELUActivation(nn.Module):
    """GPT-2's GELU class as Hugging Face defines it: parameter-free, not an nn.GELU."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3))))


class Scale(nn.Module):
    def forward(self, x):
        return 3 * x  # elementwise but linear: not an activation


class RowNorm(nn.Module):
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)  # parameter-free, non-linear, not elementwise


@pytest.mark.parametrize(
    ("module", "is_activation"),
    [
        (nn.ReLU(), True), (NewGELUActivation(), True), (Net(nn.Tanh()).net, False),  # a container is not
        (Scale(), False), (RowNorm(), False), (nn.Dropout(0.5), False), (nn.Softmax(-1), False),
        (nn.Identity(), False), (nn.LayerNorm(4, elementwise_affine=False), False),
    ],
)
def test_activation_modules_are_recognised_by_what_they_do(module, is_activation):
    from tbhealth.instruments.coverage import behaves_like_activation

    assert behaves_like_activation(module) is is_activation


def test_gpt2_style_activation_class_gets_dead_unit_statistics():
    torch.manual_seed(0)
    model = Net(nn.Linear(8, 16), NewGELUActivation(), nn.Linear(16, 2))
    inst = Instruments(model)
    inst.arm(probe=True)
    model(torch.randn(32, 8)).sum().backward()
    inst.disarm()
    assert [name for name, _ in inst.activation_layers] == ["net.1"]
    assert inst.read()["dead_fraction"] == {"net.1": 0.0}
    assert inst.functional_calls == {}  # the GELU's own tanh runs inside the hooked module
    assert "activation statistics (dead units, zero fraction) of 1 activation modules (net.1)" in inst.coverage()


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.lstm, self.out = nn.Linear(8, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.nn.functional.relu(self.fc1(x))
        h, _ = self.lstm(h.sigmoid().unsqueeze(1))
        return self.out(h[:, -1])


def test_what_cannot_be_hooked_is_counted_once_and_said():
    model = FunctionalNet()
    inst = Instruments(model)
    assert inst.activation_layers == [] and inst.functional_calls is None
    inst.arm(probe=True)
    model(torch.randn(4, 8)).sum().backward()
    inst.disarm()
    assert inst.functional_calls == {"relu": 1, "sigmoid": 1}
    inst.arm(probe=True)  # probed once per run: later sampled steps run without the mode
    model(torch.randn(4, 8))
    inst.disarm()
    assert inst.functional_calls == {"relu": 1, "sigmoid": 1}
    inst.capture_gradients()
    assert list(inst.read()["layer_grad_norms"]) == ["fc1", "lstm", "out"]  # no hooks needed
    text = inst.coverage()
    assert text.startswith("Health instruments: gradient norms of 3 layers (fc1, lstm, out); no activation module")
    assert "activation functions called inside forward (relu ×1, sigmoid ×1 per step)" in text
    assert "activations inside fused modules (LSTM)" in text


# --------------------------------------------------------------------------- logging windows


def test_window_sees_every_step_without_reading_back():
    from tbhealth.instruments.window import StepWindow

    window = StepWindow()
    window.note_norm(torch.tensor(5.0))
    window.note_norm(torch.tensor(1.7e4))
    window.absorb([torch.tensor(2.3), torch.tensor(3e20)])  # steps 11 and 12, folded on step 12
    window.absorb([torch.tensor(2.0), torch.tensor(1.9)])  # steps 13 and 14
    first, values = window.take(14)
    assert first == 11 and values.tolist() == [pytest.approx(3e20, rel=1e-6), 0.0, 1.7e4]
    assert window.take(15) == (None, None) and window.empty  # a new window
    window.absorb([torch.tensor(9.0)])
    assert window.peek(20)[1].tolist() == [9.0, 0.0, -1.0]  # no norm reported: -1
    window.absorb([torch.tensor(1.0)])
    first, values = window.peek(21)  # peeking does not end the window: 21 alone would look fine
    assert first == 20 and values.tolist() == [9.0, 0.0, -1.0]


def test_window_flags_a_nan_and_bounds_its_norm_list():
    from tbhealth.instruments import window as w

    win = w.StepWindow()
    for i in range(w.MAX_PENDING * 2 + 3):
        win.note_norm(torch.tensor(float(i)))
        assert len(win._norms) < w.MAX_PENDING
    win.absorb([torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(2.0)])
    max_loss, bad, norm = win.take(3)[1].tolist()
    assert bad == 1.0 and norm == w.MAX_PENDING * 2 + 2 and max_loss != max_loss  # NaN: the max propagates it
    win.absorb([torch.tensor(-float("inf")), torch.tensor(0.5)])
    assert win.take(5)[1].tolist()[:2] == [0.5, 1.0]  # -inf is non-finite though it is not the max


def test_thread_stack_shows_where_a_thread_waits():
    import threading

    from tbhealth.instruments.stacks import thread_stack

    release = threading.Event()

    def stuck_in_here():
        release.wait(30)

    t = threading.Thread(target=stuck_in_here, name="trainer")
    t.start()
    try:
        mine = thread_stack(t.ident)
        assert mine.startswith('Thread "trainer":') and "in stuck_in_here" in mine and "release.wait(30)" in mine
        every = thread_stack(t.ident, all_threads=True)
        assert every.startswith('Thread "trainer":') and 'Thread "MainThread":' in every
    finally:
        release.set()
        t.join()
    assert thread_stack(t.ident) is None


def test_a_clipped_sample_is_judged_at_its_pre_clip_size():
    from tbhealth.instruments.watch import _pre_clip

    clipped = {"global_grad_norm": 1.0, "layer_grad_norms": {"fc1": 1e-4, "out": 0.99}, "reported_grad_norm": 1e4}
    scaled = _pre_clip(clipped)
    assert scaled["global_grad_norm"] == 1e4 and scaled["layer_grad_norms"] == pytest.approx({"fc1": 1.0, "out": 9900})
    unclipped = {"global_grad_norm": 3.0, "layer_grad_norms": {"fc1": 1e-9}, "reported_grad_norm": 3.0}
    assert _pre_clip(unclipped) is unclipped  # not clipped: judged as measured (fc1 still vanishes)
    assert _pre_clip({"global_grad_norm": 3.0, "reported_grad_norm": None})["global_grad_norm"] == 3.0
