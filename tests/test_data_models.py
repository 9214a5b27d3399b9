"""Built-in data and models, and the registry that builds them from a config (real tensors, real training)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tbhealth.training import registry, validation
from tbhealth.training.config import ConfigError, config_from_dict, load_config
from tbhealth.training.data import digits, synthetic_classification, synthetic_regression
from tbhealth.training.models import CNN, MLP

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --------------------------------------------------------------------------- data


def test_digits_shapes_scale_and_split():
    train, val = digits()
    x, y = train.tensors
    assert len(train) + len(val) == 1797 and len(val) == round(1797 * 0.2)
    assert x.shape[1:] == (64,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert set(torch.cat([y, val.tensors[1]]).tolist()) == set(range(10)) and train.num_classes == 10
    images, _ = digits(as_images=True)
    assert images.tensors[0].shape[1:] == (1, 8, 8)
    assert torch.equal(images.tensors[0].flatten(1), x)  # same samples, same split


def test_split_is_deterministic_by_seed():
    a, b, c = digits(seed=3)[1], digits(seed=3)[1], digits(seed=4)[1]
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    train, val = digits(val_fraction=0.5, seed=None)
    assert abs(len(train) - len(val)) <= 1


def test_synthetic_classification():
    train, val = synthetic_classification(n_samples=300, n_features=5, n_classes=3, seed=1)
    assert len(train) + len(val) == 300 and train.tensors[0].shape[1:] == (5,) and train.num_classes == 3
    again, _ = synthetic_classification(n_samples=300, n_features=5, n_classes=3, seed=1)
    assert torch.equal(train.tensors[0], again.tensors[0])
    other, _ = synthetic_classification(n_samples=300, n_features=5, n_classes=3, seed=2)
    assert not torch.equal(train.tensors[0], other.tensors[0])
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        synthetic_classification(n_classes=1)
    with pytest.raises(ValueError, match="noise must be a number >= 0"):
        synthetic_classification(noise=-1)


def test_synthetic_regression_targets_are_columns_with_signal():
    train, val = synthetic_regression(n_samples=500, n_features=4, noise=0.1, seed=0)
    x, y = train.tensors
    assert x.shape[1:] == (4,) and y.shape[1:] == (1,) and y.dtype == torch.float32
    assert float(y.var()) > 0.5  # signal well above the noise variance (0.01)
    assert torch.equal(y, synthetic_regression(n_samples=500, n_features=4, noise=0.1, seed=0)[0].tensors[1])


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid", "silu", "leaky_relu"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_mlp_forward_and_named_activation_modules(activation, norm):
    x = digits()[0].tensors[0][:16]
    model = MLP(64, 10, hidden=[32, 16], activation=activation, dropout=0.1, norm=norm)
    assert model(x).shape == (16, 10)
    names = [name for name, m in model.named_modules() if name.startswith("act")]
    assert names == ["act1", "act2"]  # modules, so forward hooks (dead-neuron checks) can see them


def test_mlp_flattens_images():
    assert MLP(64, 3)(torch.rand(5, 1, 8, 8)).shape == (5, 3)


@pytest.mark.parametrize("channels", [[8], [16, 32], [8, 8, 8, 8, 8]])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_cnn_works_on_8x8_for_any_depth(channels, norm):
    x = digits(as_images=True)[0].tensors[0][:4]
    model = CNN(1, 10, channels=channels, norm=norm, dropout=0.2)
    assert model(x).shape == (4, 10)
    assert model(x[:, 0]).shape == (4, 10)  # (N, H, W) gets a channel axis


@pytest.mark.parametrize(("build", "message"), [
    (lambda: MLP(64, 10, activation="rleu"), "activation must be one of relu.*Did you mean 'relu'"),
    (lambda: MLP(64, 10, hidden=[32, 0]), r"hidden\[1\] must be a positive integer"),
    (lambda: MLP(64, 10, hidden=32), "hidden must be a list"),
    (lambda: MLP(64, 10, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    (lambda: MLP(64, 10, norm="group"), "norm must be one of none, batch, layer"),
    (lambda: CNN(1, channels=[]), "out_features must be a positive integer"),
    (lambda: CNN(1, 10, channels=[]), "channels must list at least one"),
    (lambda: CNN(1, out_features=10, num_classes=5), "disagree"),
])
def test_model_arguments_are_checked(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# --------------------------------------------------------------------------- registry


def test_build_data_describes_the_samples():
    bundle = registry.build_data(config_from_dict({}))
    assert (bundle.input_shape, bundle.num_classes, bundle.task, bundle.target_shape) == ((64,), 10, "classification", ())
    images = registry.build_data(config_from_dict({"data": {"kwargs": {"as_images": True}}}))
    assert images.input_shape == (1, 8, 8)
    reg = registry.build_data(config_from_dict({"loss": "MSELoss", "data": {"source": "synthetic_regression"}}))
    assert (reg.input_shape, reg.num_classes, reg.task, reg.target_shape) == ((8,), None, "regression", (1,))


def test_build_data_passes_seed_and_val_fraction():
    bundle = registry.build_data(config_from_dict({"seed": 7, "data": {"val_fraction": 0.5}}))
    assert abs(len(bundle.train) - len(bundle.val)) <= 1
    assert torch.equal(bundle.val.tensors[0], digits(val_fraction=0.5, seed=7)[1].tensors[0])


@pytest.mark.parametrize(("overrides", "shape"), [
    ({}, (128, 64)),
    ({"model": {"source": "cnn"}, "data": {"kwargs": {"as_images": True}}}, (16, 1, 3, 3)),
    ({"model": {"kwargs": {"hidden": [7]}}}, (7, 64)),
    ({"model": {"source": "cnn", "kwargs": {"num_classes": 10}}, "data": {"kwargs": {"as_images": True}}}, (16, 1, 3, 3)),
])
def test_build_model_takes_sizes_from_the_data(overrides, shape):
    cfg = config_from_dict(overrides)
    bundle = registry.build_data(cfg)
    model = registry.build_model(cfg, bundle)
    assert tuple(next(model.parameters()).shape) == shape
    x, _ = bundle.train[:5]
    assert model(x).shape == (5, 10)


def test_regression_model_outputs_the_target_size():
    cfg = config_from_dict({"loss": "MSELoss", "data": {"source": "synthetic_regression"}})
    bundle = registry.build_data(cfg)
    x, y = bundle.train[:4]
    assert registry.build_model(cfg, bundle)(x).shape == y.shape == (4, 1)


def test_cnn_on_flat_data_says_to_use_images():
    cfg = config_from_dict({"model": {"source": "cnn"}})
    with pytest.raises(ConfigError, match="as_images: true"):
        registry.build_model(cfg, registry.build_data(cfg))


def test_unknown_model_kwarg_is_named_with_the_allowed_ones():
    cfg = config_from_dict({})
    cfg.model.kwargs = {"hiden": [3]}  # a config assembled in code skips the load-time check
    with pytest.raises(ConfigError) as e:
        registry.build_model(cfg, registry.build_data(cfg))
    assert "model.kwargs.hiden" in str(e.value) and "Did you mean 'hidden'" in str(e.value)
    assert "activation" in str(e.value)
    with pytest.raises(ConfigError, match="model.kwargs.hiden"):
        validation.check_config(cfg)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        def plain_data():  # asks for nothing: no val_fraction, no seed
            x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
            return TensorDataset(x[:15], torch.arange(15) % 3), TensorDataset(x[15:], torch.arange(5) % 3)

        def seeded_data(seed, scale=1.0):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(10, 2, generator=g) * scale
            return TensorDataset(x[:8], torch.zeros(8, dtype=torch.long)), TensorDataset(x[8:], torch.ones(2, dtype=torch.long))

        def not_datasets():
            return [1, 2, 3]

        def linear(num_classes, width=4):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_classes))

        def sq_error(pred, target):
            return ((pred - target) ** 2).mean()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_factories"


def test_user_factories_get_only_what_they_ask_for(user_module):
    cfg = config_from_dict({"data": {"source": f"{user_module}:plain_data"}, "model": {"source": f"{user_module}:linear"}})
    bundle = registry.build_data(cfg)
    assert (bundle.input_shape, bundle.num_classes) == ((2,), 3)  # classes counted from the labels
    model = registry.build_model(cfg, bundle)
    assert model(bundle.train[:2][0]).shape == (2, 3)
    seeded = config_from_dict({"seed": 5, "data": {"source": f"{user_module}:seeded_data", "kwargs": {"scale": 2.0}}})
    x = registry.build_data(seeded).train.tensors[0]
    assert torch.equal(x, torch.randn(10, 2, generator=torch.Generator().manual_seed(5))[:8] * 2.0)


def test_import_paths_find_modules_in_the_working_directory(tmp_path, monkeypatch):
    """The ``tbhealth`` script does not put the working directory on sys.path; the registry does."""
    (tmp_path / "cwd_only_data.py").write_text("from tbhealth.training.data import digits as make\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    bundle = registry.build_data(config_from_dict({"data": {"source": "cwd_only_data:make"}}))
    assert bundle.num_classes == 10


def test_explicit_seed_replaces_a_null_config_seed():
    cfg = config_from_dict({"seed": None})
    a, b = registry.build_data(cfg, seed=11), registry.build_data(cfg, seed=11)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])


def test_user_factory_mistakes_are_config_errors(user_module):
    with pytest.raises(ConfigError, match="data.kwargs.scal.*Did you mean 'scale'"):
        config_from_dict({"data": {"source": f"{user_module}:seeded_data", "kwargs": {"scal": 1}}})
    with pytest.raises(ConfigError, match=r"must return \(train_dataset, val_dataset\)"):
        registry.build_data(config_from_dict({"data": {"source": f"{user_module}:not_datasets"}}))


def test_build_loss_accepts_classes_and_functions(user_module):
    pred, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    assert isinstance(registry.build_loss(config_from_dict({})), nn.CrossEntropyLoss)
    fn_loss = registry.build_loss(config_from_dict({"loss": "torch.nn.functional:cross_entropy"}))
    assert isinstance(fn_loss, nn.Module)
    assert torch.allclose(fn_loss(pred, target), nn.functional.cross_entropy(pred, target))
    mine = registry.build_loss(config_from_dict({"loss": f"{user_module}:sq_error"}))
    assert float(mine(torch.ones(2), torch.zeros(2))) == 1.0


def test_build_optimizer_and_kwargs_errors():
    params = [nn.Parameter(torch.zeros(3))]
    opt = registry.build_optimizer(config_from_dict({"optimizer": {"name": "SGD", "lr": 0.1, "kwargs": {"momentum": 0.9}}}), params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="optimizer.kwargs.momentun.*Did you mean 'momentum'"):
        config_from_dict({"optimizer": {"name": "SGD", "kwargs": {"momentun": 0.9}}})
    with pytest.raises(ConfigError, match="optimizer.kwargs.lr: set the learning rate as optimizer.lr"):
        config_from_dict({"optimizer": {"kwargs": {"lr": 0.1}}})


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)


def test_build_scheduler_fills_the_counts_it_can():
    assert registry.build_scheduler(config_from_dict({}), _optimizer(), 10) is None
    plateau = registry.build_scheduler(config_from_dict({"scheduler": {"name": "ReduceLROnPlateau", "monitor": "val_acc"}}),
                                       _optimizer(), 10)
    assert registry.is_plateau(plateau) and plateau.mode == "max"
    cycle = registry.build_scheduler(config_from_dict({"epochs": 3, "scheduler": {"name": "OneCycleLR", "interval": "step"}}),
                                     _optimizer(), 10)
    assert cycle.total_steps == 30 and not registry.is_plateau(cycle)
    cosine = registry.build_scheduler(config_from_dict({"epochs": 4, "scheduler": {"name": "CosineAnnealingLR"}}), _optimizer(), 10)
    assert cosine.T_max == 4


def test_scheduler_rules_that_need_the_whole_config():
    with pytest.raises(ConfigError, match="scheduler.interval: ReduceLROnPlateau steps on an epoch metric"):
        config_from_dict({"scheduler": {"name": "ReduceLROnPlateau", "interval": "step"}})
    with pytest.raises(ConfigError, match="scheduler.monitor: 'val_acc' needs accuracy"):
        config_from_dict({"loss": "MSELoss", "scheduler": {"monitor": "val_acc"}})


@pytest.mark.slow
def test_digits_example_reaches_95_percent_with_a_plain_loop():
    """The promise of examples/digits.yaml, checked with the registry's own builders (~3 s on CPU).

    One intra-op thread: for a model this small, extra threads only add contention (on a busy
    2-core machine two threads made this test 7x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_digits_example()
    finally:
        torch.set_num_threads(threads)


def _train_digits_example() -> None:
    cfg = load_config(EXAMPLES / "digits.yaml")
    torch.manual_seed(cfg.seed)
    bundle = registry.build_data(cfg)
    model, loss_fn = registry.build_model(cfg, bundle), registry.build_loss(cfg)
    optimizer = registry.build_optimizer(cfg, model.parameters())
    loader = DataLoader(bundle.train, batch_size=cfg.data.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    scheduler = registry.build_scheduler(cfg, optimizer, len(loader))
    lrs = []
    for _ in range(cfg.epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    model.eval()
    with torch.no_grad():
        x, y = bundle.val.tensors
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy >= 0.95, accuracy
    assert lrs[-1] < cfg.optimizer.lr / 5  # the LR visibly steps down during the run
