"""Start-up does each thing once: validation builds nothing, the trainer builds everything once, and
heavy modules load only where they are used. Build-time mistakes still end as a ConfigError naming
the key, from the real build or, for a distributed launch, from a dry build before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tbhealth.training import registry, validation
from tbhealth.training.config import ConfigError, config_from_dict, load_config

COUNTING = textwrap.dedent("""
    import collections
    import torch
    from torch.utils.data import TensorDataset

    calls = collections.Counter()

    def data(seed=0):
        calls["data"] += 1
        x = torch.randn(24, 3, generator=torch.Generator().manual_seed(seed))
        y = torch.arange(24) % 2
        return TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])

    def model(in_features, out_features, width=4):
        calls["model"] += 1
        return torch.nn.Sequential(torch.nn.Linear(in_features, width), torch.nn.ReLU(), torch.nn.Linear(width, out_features))

    class SGD(torch.optim.SGD):
        def __init__(self, params, lr, momentum=0.0):
            calls["optimizer"] += 1
            super().__init__(params, lr=lr, momentum=momentum)

    class StepLR(torch.optim.lr_scheduler.StepLR):
        def __init__(self, optimizer, step_size, gamma=0.1):
            calls["scheduler"] += 1
            super().__init__(optimizer, step_size=step_size, gamma=gamma)
""")


@pytest.fixture
def counting(tmp_path, monkeypatch):
    (tmp_path / "counting_factories.py").write_text(COUNTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    import counting_factories

    yield counting_factories
    sys.modules.pop("counting_factories", None)


def test_validation_builds_nothing_and_the_trainer_builds_each_part_once(tmp_path, counting):
    from tbhealth.training.trainer import Trainer

    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        epochs: 1
        device: cpu
        data: {source: "counting_factories:data", batch_size: 8}
        model: {source: "counting_factories:model", kwargs: {width: 3}}
        optimizer: {name: "counting_factories:SGD", lr: 0.1, kwargs: {momentum: 0.5}}
        scheduler: {name: "counting_factories:StepLR", kwargs: {step_size: 2}}
    """))
    cfg = load_config(tmp_path / "cfg.yaml")
    assert dict(counting.calls) == {}
    Trainer(cfg, tmp_path / "run", verbose=False)
    assert dict(counting.calls) == {"data": 1, "model": 1, "optimizer": 1, "scheduler": 1}


@pytest.mark.parametrize(("d", "key", "fragment"), [
    ({"optimizer": {"kwargs": {"betas": [0.9, 2]}}}, "optimizer.kwargs", "Invalid beta parameter at index 1: 2"),
    ({"model": {"kwargs": {"activation": "rleu"}}}, "model.kwargs.activation", "Did you mean 'relu'?"),
    ({"scheduler": {"name": "StepLR", "kwargs": {"step_size": 1, "last_epoch": 3}}}, "scheduler.kwargs", "initial_lr"),
])
def test_build_time_mistakes_read_the_same_from_the_real_build_and_the_dry_build(d, key, fragment):
    cfg = config_from_dict(d)  # loads: only a constructor can judge these values
    with pytest.raises(ConfigError) as dry:
        validation.check_config(cfg, dry_build=True)
    with pytest.raises(ConfigError) as real:
        bundle = registry.build_data(cfg)
        model = registry.build_model(cfg, bundle)
        registry.build_scheduler(cfg, registry.build_optimizer(cfg, model.parameters()), 10)
    assert [p.path for p in real.value.problems] == [p.path for p in dry.value.problems] == [key]
    assert real.value.problems[0].message == dry.value.problems[0].message
    assert fragment in str(real.value)


def run_cli(cwd: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TBHEALTH_LOGDIR": str(cwd / "runs"), "COLUMNS": "400", "NO_COLOR": "1"}
    argv = ["-c", code] if code else ["-m", "tbhealth_cli.app", *args]
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_distributed_launch_refuses_a_build_time_mistake_before_starting_workers(tmp_path):
    (tmp_path / "cfg.yaml").write_text("optimizer:\n  kwargs:\n    betas: [0.9, 2]\n")
    result = run_cli(tmp_path, "train", "cfg.yaml", "--nproc-per-node", "1", "--set", "device=cpu")
    assert result.returncode == 2, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert "optimizer.kwargs" in err and "Invalid beta parameter" in err
    assert "Traceback" not in result.stdout + result.stderr and "torch.distributed" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_heavy_modules_load_only_where_used(tmp_path):
    """The CLI and config validation leave scikit-learn, TensorBoard, plotly and psutil unloaded."""
    (tmp_path / "cfg.yaml").write_text("epochs: 2\n")
    code = textwrap.dedent("""
        import sys
        import tbhealth_cli.app
        from tbhealth.training.config import load_config
        load_config("cfg.yaml")
        heavy = ("sklearn", "tensorboard", "plotly", "psutil")
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    result = run_cli(tmp_path, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"



def test_built_in_digits_are_scikit_learns_without_importing_it(tmp_path):
    from sklearn.datasets import load_digits

    from tbhealth.training.data import _read_digits

    x, y = _read_digits()
    x_ref, y_ref = load_digits(return_X_y=True)
    assert (x == x_ref).all() and (y == y_ref).all() and x.dtype == x_ref.dtype and y.dtype == y_ref.dtype
    code = "import sys; from tbhealth.training.data import digits; digits(); print('sklearn' in sys.modules)"
    assert run_cli(tmp_path, code=code).stdout.strip() == "False"


def test_train_imports_no_other_command_and_help_lists_them_all(tmp_path):
    """The app builds a command, importing its module, only when it is looked up: `tbhealth train`
    loads none of the others, and `tbhealth --help` still lists every command."""
    code = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from tbhealth_cli.app import app
        result = CliRunner().invoke(app, ["train", "--help"])
        assert result.exit_code == 0, result.output
        print(sorted(m for m in sys.modules if m.startswith("tbhealth_cli.")))
    """)
    result = run_cli(tmp_path, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['tbhealth_cli.app', 'tbhealth_cli.common', 'tbhealth_cli.lifecycle', 'tbhealth_cli.train']"
    listed = run_cli(tmp_path, "--help").stdout.split()
    for command in ("train", "pause", "resume", "stop", "checkpoint", "status", "alerts", "runs", "board"):
        assert command in listed
