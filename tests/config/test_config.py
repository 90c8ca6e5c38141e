import pytest
from omegaconf import OmegaConf

from mmssl import config as C


def test_recipe_loads_and_derives_lr():
    cfg = C.load("mae_vitb")
    assert cfg.objective == "mae" and cfg.mae.mask_ratio == 0.75 and cfg.trainer.max_epochs == 800
    assert C.global_batch(cfg) == 4096  # 64 per GPU x 8 GPUs x 8 nodes
    assert C.learning_rate(cfg) == pytest.approx(1.5e-4 * 4096 / 256)
    sqrt = C.load("mae_vitb", ["optim.lr_scaling=sqrt", "optim.base_lr=0.075"])
    assert C.learning_rate(sqrt) == pytest.approx(0.075 * 64)


def test_overrides_are_typed():
    cfg = C.load("mae_vitb", ["optim.base_lr=3e-4", "trainer.devices=2", "data.crop_scale=[0.5,1.0]"])
    assert isinstance(cfg.optim.base_lr, float) and cfg.optim.base_lr == 3e-4  # not the string "3e-4"
    assert cfg.trainer.devices == 2 and list(cfg.data.crop_scale) == [0.5, 1.0]


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.base_lrr=1e-3", "optim.base_lrr"),  # typo
        ("optim.base_lr=fast", "optim.base_lr"),  # wrong type
        ("mae.mask_ratio=1.5", "mae.mask_ratio"),  # out of range
        ("objective=byol", "objective"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("data.batch_size=0", "data.batch_size"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load("mae_vitb", [override])


def test_typo_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  weight_decey: 0.1\n")
    with pytest.raises(C.ConfigError, match=r"optim\.weight_decey.*bad\.yaml"):
        C.load(str(bad))


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="mae_vitb"):
        C.load("no_such_recipe")


def test_active_view_hides_other_objectives_and_round_trips(tmp_path):
    cfg = C.load("mae_demo")
    view = C.active(cfg)
    assert "mae" in view
    path = tmp_path / "config.yaml"
    OmegaConf.save(view, path)
    again = C.load(str(path))  # a saved run config loads back as a config
    assert C.to_dict(again) == C.to_dict(cfg)
