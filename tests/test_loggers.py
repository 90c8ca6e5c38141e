"""Experiment loggers (``trainer.loggers``, mmssl/loggers.py), pictures sent to the loggers that take images, the
progress-bar switch, and ``PretrainModule.load_from_checkpoint(path)`` rebuilding the objective from the run
config inside the checkpoint."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny_cfg

from mmssl import config as C
from mmssl import factory
from mmssl.lit import PretrainModule

TINY_RUN = ["data.batch_size=4", "data.num_workers=0", "data.samples_per_epoch=8", "data.shuffle_buffer=8",
            "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.picture_every_n_steps=1"]  # fmt: skip


def test_an_unknown_logger_is_refused_naming_the_key():
    with pytest.raises(C.ConfigError, match=r"config key 'trainer.loggers': unknown logger 'tensorbord'"):
        C.load("mae_demo", ["trainer.loggers=[csv,tensorbord]"])


def test_a_logger_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        C.ConfigError, match=r"trainer.loggers': the wandb logger needs the wandb package.*mmssl\[wandb\]"
    ):
        C.load("mae_demo", ["trainer.loggers=[wandb]"])


def run(tmp_path, *overrides: str):
    cfg = tiny_cfg(*TINY_RUN, f"out_dir={tmp_path}", *overrides)
    datamodule = factory.build_datamodule(cfg)
    plan = factory.plan(cfg, datamodule)
    module = factory.build_module(cfg, plan)
    trainer = factory.build_trainer(cfg, plan)
    trainer.fit(module, datamodule=datamodule)
    return cfg, module, trainer


def test_tensorboard_gets_scalars_and_pictures_and_load_from_checkpoint_rebuilds_the_objective(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, module, trainer = run(tmp_path, "trainer.loggers=[csv,tensorboard]", "trainer.progress_bar=false")
    assert trainer.progress_bar_callback is None
    logs = tmp_path / cfg.name / "logs" / "version_0"
    assert (logs / "metrics.csv").is_file()  # CSV and TensorBoard share one version folder
    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    pictures = events.Images("pictures")
    assert {p.step for p in pictures} == {1, 2}  # every step, and the final picture
    assert pictures[-1].width > 100 and pictures[-1].encoded_image_string[:4] == b"\x89PNG"

    ckpt = tmp_path / cfg.name / "checkpoints" / "last.ckpt"
    loaded = PretrainModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert type(loaded.objective) is type(module.objective)
    trained = module.objective.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.objective.state_dict().items())
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.objective.eval()({"image": images}, noise=noise)["loss"],
                                   module.objective.eval()({"image": images}, noise=noise)["loss"])  # fmt: skip


def test_without_an_objective_or_config_the_module_says_what_it_needs():
    with pytest.raises(TypeError, match="needs an objective"):
        PretrainModule(lr=1.0, total_steps=1)
