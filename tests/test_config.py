"""The config: defaults, --set overrides, dump/load round trip, and every user mistake as one clear error.

``BAD_CONFIGS`` is shared with tests/test_config_cli.py, which feeds the same files to the real CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tbhealth.training import validation
from tbhealth.training.config import (
    Config, ConfigError, apply_overrides, config_from_dict, dump_config, load_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# (id, YAML text, --set overrides, fragments that must all be in the message).
# "cfg.yaml:N:" checks the file:line; the other fragments name the key path and the bad value.
BAD_CONFIGS: list[tuple[str, str, list[str], list[str]]] = [
    ("unknown_top_key", "epochs: 2\nfoo: 1\n", [], ["cfg.yaml:2:1", "foo", "Allowed: name, logdir"]),
    ("unknown_nested_key", "data:\n  batchsize: 32\n", [], ["cfg.yaml:2:3", "data.batchsize", "'batch_size'"]),
    ("wrong_type", "epochs: ten\n", [], ["cfg.yaml:1:1", "epochs", "'ten'", "integer"]),
    ("negative_lr", "optimizer:\n  lr: -0.1\n", [], ["cfg.yaml:2:3", "optimizer.lr", "-0.1", "greater than 0"]),
    ("zero_epochs", "epochs: 0\n", [], ["epochs", "(got 0)", "greater than or equal to 1"]),
    ("bad_device", "device: gpu0\n", [], ["device", "'gpu0'", "cuda:N"]),
    ("unknown_optimizer", "optimizer:\n  name: Adamm\n", [], ["cfg.yaml:2:3", "optimizer.name", "'Adamm'", "Did you mean 'Adam'", "SGD"]),
    ("unknown_scheduler", "scheduler:\n  name: StepLRR\n", [], ["scheduler.name", "'StepLRR'", "'StepLR'", "ReduceLROnPlateau"]),
    ("unknown_loss", "loss: CrossEntropy\n", [], ["loss", "'CrossEntropy'", "'CrossEntropyLoss'", "MSELoss"]),
    ("unimportable_source", "data:\n  source: nope.mod:fn\n", [], ["cfg.yaml:2:3", "data.source", "'nope.mod:fn'", "No module named 'nope'"]),
    ("not_callable_source", "model:\n  source: math:pi\n", [], ["model.source", "'math:pi'", "float", "not a function"]),
    ("unknown_builtin_data", "data:\n  source: digit\n", [], ["data.source", "'digit'", "'digits'", "synthetic_regression"]),
    ("yaml_syntax", "epochs: 3\nname: a: b\n", [], ["cfg.yaml:2:8", "YAML syntax error"]),
    ("yaml_unclosed", "epochs: 3\ndata:\n  source: [digits\n", [], ["YAML syntax error", "line 3, column 11"]),
    ("duplicate_key", "epochs: 3\nepochs: 4\n", [], ["cfg.yaml:2:1", "epochs", "duplicate key (first at line 1)"]),
    ("top_not_mapping", "- epochs\n- 3\n", [], ["top level must be a mapping", "list"]),
    ("bad_set_path", "epochs: 2\n", ["optimizer.nme=0.1"], ["--set optimizer.nme=0.1", "optimizer.nme", "'name'"]),
    ("bad_set_value", "epochs: 2\n", ["data.batch_size=-4"], ["--set data.batch_size=-4", "data.batch_size", "-4"]),
    ("bad_health_threshold", "health:\n  divergence:\n    factor: 0.5\n", [], ["cfg.yaml:3:5", "health.divergence.factor", "0.5"]),
    ("bad_health_action", "health:\n  overfitting:\n    action: explode\n", [], ["health.overfitting.action", "'explode'", "'warn'"]),
    ("val_fraction", "data:\n  val_fraction: 1.5\n", [], ["data.val_fraction", "1.5", "less than 1"]),
    ("bad_model_kwarg", "model:\n  kwargs:\n    hiden: [32]\n", [], ["cfg.yaml:3:5", "model.kwargs.hiden", "'hidden'", "activation"]),
    ("bad_activation", "model:\n  kwargs:\n    activation: rleu\n", [], ["model.kwargs.activation", "'rleu'", "'relu'"]),
    ("scheduler_missing_arg", "scheduler:\n  name: StepLR\n", [], ["scheduler.kwargs", "'step_size'"]),
    ("bad_optimizer_kwarg", "optimizer:\n  kwargs:\n    betas: [0.9, 2]\n", [], ["optimizer.kwargs", "'Adam'", "beta"]),
    ("bad_run_name", "name: ../evil\n", [], ["name", "'../evil'", "plain name"]),
]
#: Values only a constructor judges: loading checks names and signatures and builds nothing, so
#: these surface from the build (the trainer's, or a dry build on stand-ins) with the same message.
BUILD_TIME = {"bad_activation", "bad_optimizer_kwarg"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- defaults and task


def test_defaults_match_the_documented_contract():
    cfg = config_from_dict({})
    assert (cfg.name, cfg.logdir, cfg.seed, cfg.epochs, cfg.device, cfg.task) == (None, "runs", 0, 10, "auto", "auto")
    assert (cfg.data.source, cfg.data.kwargs, cfg.data.batch_size, cfg.data.val_fraction, cfg.data.num_workers) == (
        "digits", {}, 64, 0.2, 0)
    assert (cfg.model.source, cfg.loss, cfg.optimizer.name, cfg.optimizer.lr) == ("mlp", "CrossEntropyLoss", "Adam", 1e-3)
    assert (cfg.scheduler.name, cfg.scheduler.monitor, cfg.scheduler.interval) == (None, "val_loss", "epoch")
    assert (cfg.checkpoint.every_epochs, cfg.checkpoint.keep_last, cfg.logging.every_steps) == (1, 3, 50)
    assert (cfg.amp, cfg.grad_clip, cfg.accumulate_steps) == (False, None, 1)
    assert cfg.health.divergence.action == "warn"
    assert cfg.resolved_task == "classification"


@pytest.mark.parametrize(("loss", "task", "expected"), [
    ("CrossEntropyLoss", "auto", "classification"),
    ("BCEWithLogitsLoss", "auto", "classification"),
    ("torch.nn.functional:cross_entropy", "auto", "classification"),
    ("MSELoss", "auto", "regression"),
    ("torch.nn.functional:l1_loss", "auto", "regression"),
    ("MSELoss", "classification", "classification"),
    ("CrossEntropyLoss", "regression", "regression"),
])
def test_task_auto_follows_the_loss(loss, task, expected):
    assert config_from_dict({"loss": loss, "task": task}).resolved_task == expected


def test_empty_sections_and_null_kwargs_mean_defaults():
    cfg = config_from_dict({"scheduler": None, "data": {"kwargs": None}})
    assert cfg.scheduler.name is None and cfg.data.kwargs == {}


# --------------------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml():
    out = apply_overrides({}, [
        "epochs=5", "optimizer.lr=3e-4", "data.kwargs.as_images=true", "model.kwargs.hidden=[32, 16]",
        "scheduler.name=null", "name=run-1", "optimizer.kwargs={betas: [0.8, 0.9]}",
    ])
    assert out == {
        "epochs": 5, "optimizer": {"lr": 3e-4, "kwargs": {"betas": [0.8, 0.9]}},
        "data": {"kwargs": {"as_images": True}}, "model": {"kwargs": {"hidden": [32, 16]}},
        "scheduler": {"name": None}, "name": "run-1",
    }


def test_overrides_copy_the_input_and_later_ones_win():
    base = {"optimizer": {"name": "SGD", "lr": 0.1}}
    out = apply_overrides(base, ["optimizer.lr=0.5", "optimizer.lr=0.01", "health.divergence.action=stop"])
    assert out == {"optimizer": {"name": "SGD", "lr": 0.01}, "health": {"divergence": {"action": "stop"}}}
    assert base == {"optimizer": {"name": "SGD", "lr": 0.1}}


@pytest.mark.parametrize(("override", "fragments"), [
    ("optimizer.nme=1", ["optimizer.nme", "Did you mean 'name'", "Allowed: name, lr, kwargs"]),
    ("epochz=3", ["epochz", "'epochs'"]),
    ("health.divergence.fctor=2", ["health.divergence.fctor", "'factor'"]),
    ("epochs.max=3", ["epochs", "no key 'max'"]),
    ("epochs", ["expected key.path=value"]),
    ("=3", ["expected key.path=value"]),
])
def test_override_unknown_paths_fail_naming_them(override, fragments):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [override])
    assert f"--set {override}" in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_kwargs_take_any_new_key_from_set(tmp_path):
    cfg = load_config(write(tmp_path, "epochs: 2\n"), ["data.source=synthetic_classification",
                                                       "data.kwargs.n_classes=3", "optimizer.kwargs.weight_decay=1e-2"])
    assert cfg.data.kwargs == {"n_classes": 3} and cfg.optimizer.kwargs == {"weight_decay": 0.01}


def test_precedence_set_over_file_over_defaults(tmp_path):
    path = write(tmp_path, "epochs: 3\noptimizer:\n  lr: 0.01\n  name: SGD\n")
    cfg = load_config(path, ["optimizer.lr=0.05"])
    assert cfg.epochs == 3  # file over default
    assert cfg.optimizer.lr == 0.05  # --set over file
    assert cfg.optimizer.name == "SGD" and cfg.data.batch_size == 64  # untouched keys keep their layer


def test_yaml_reads_exponent_floats(tmp_path):
    cfg = load_config(write(tmp_path, "optimizer:\n  lr: 3e-4\n  kwargs:\n    weight_decay: 1e-5\n"))
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.kwargs["weight_decay"] == 1e-5


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing yet\n")) == config_from_dict({})


# --------------------------------------------------------------------------- dump / load


def test_dump_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(write(tmp_path, "name: r1\nepochs: 4\nseed: null\nloss: MSELoss\n"), [
        "model.kwargs.hidden=[8]", "scheduler.name=ReduceLROnPlateau", "scheduler.kwargs.patience=2",
        "health.plateau.patience=7", "grad_clip=1.5", "data.source=synthetic_regression"])
    dumped = dump_config(cfg)
    assert "task resolves to regression" in dumped
    again = load_config(write(tmp_path, dumped))
    assert again == cfg
    assert again.health.plateau.patience == 7 and again.scheduler.kwargs == {"patience": 2}


@pytest.mark.parametrize("name", ["digits.yaml", "digits_cnn.yaml", "regression.yaml"])
def test_examples_load_and_round_trip(tmp_path, name):
    cfg = load_config(EXAMPLES / name)
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


def test_examples_say_what_they_promise():
    digits = load_config(EXAMPLES / "digits.yaml")
    assert (digits.data.source, digits.model.source, digits.resolved_task) == ("digits", "mlp", "classification")
    assert digits.scheduler.name and digits.logging.every_steps <= 10
    cnn = load_config(EXAMPLES / "digits_cnn.yaml")
    assert cnn.model.source == "cnn" and cnn.data.kwargs["as_images"] is True
    reg = load_config(EXAMPLES / "regression.yaml")
    assert (reg.data.source, reg.loss, reg.resolved_task) == ("synthetic_regression", "MSELoss", "regression")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("text", "overrides", "fragments"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_key_value_and_place(request, tmp_path, text, overrides, fragments):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(write(tmp_path, text), overrides)
        assert request.node.callspec.id in BUILD_TIME, "loading should have refused it"
        validation.check_config(cfg, dry_build=True)
    message = str(e.value)
    assert message.startswith("Invalid config ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    assert "Traceback" not in message and e.value.problems


def test_several_problems_are_listed_one_per_line_in_file_order(tmp_path):
    path = write(tmp_path, "epochs: 0\noptimizer:\n  name: Adamm\n  lr: -1\ndata:\n  val_fraction: 2\nfoo: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert lines[0].endswith("(5 problems):")
    keys = ["epochs", "optimizer.name", "optimizer.lr", "data.val_fraction", "foo"]
    assert [line.split(": ")[1] for line in lines[1:]] == keys
    assert [int(line.split(":")[1]) for line in lines[1:]] == [1, 3, 4, 6, 7]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_config_error_from_plain_dict_has_no_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"epochs": -1}, source="<test>")
    assert str(e.value).splitlines()[1].strip().startswith("epochs: ")
    assert "<test>" in str(e.value)


def test_assignment_is_validated():
    from pydantic import ValidationError

    cfg = Config()
    with pytest.raises(ValidationError, match="plain name"):
        cfg.name = "a/b"


def test_importing_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tbhealth.training.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
