"""Config sections check themselves (config/objectives.py): every choice field refuses a value outside its
options and names its key; the options are the constructors' own vocabularies; an objective's full checks
apply only when the run uses it; training-only requirements wait for a training run."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass

import pytest

from mmssl import config as C
from mmssl import factory
from mmssl.config.objectives import PROJECTOR_PATTERN
from mmssl.objectives.igpt import MODES
from mmssl.sequence import NORMS
from mmssl.targets.hog import GRADIENTS
from mmssl.vlm.projector import Projector
from mmssl.vlm.prompt import CONVERSATIONS

CHOICES = [
    (f"{section.name}.{f.name}", f.metadata["choices"])
    for section in fields(C.Config)
    if is_dataclass(section.default_factory)
    for f in fields(section.default_factory)
    if "choices" in f.metadata
]


@pytest.mark.parametrize("key, options", CHOICES, ids=[key for key, _ in CHOICES])
def test_a_choice_outside_its_options_names_its_key(key, options):
    assert C.load("mae_demo", [f"{key}={options[-1]}"])  # every option loads
    with pytest.raises(C.ConfigError, match=rf"'{re.escape(key)}': must be one of {', '.join(options)}"):
        C.load("mae_demo", [f"{key}=nonsense"])


def test_choice_options_are_the_constructors_vocabularies():
    options = dict(CHOICES)
    assert options["igpt.mode"] == MODES
    assert options["igpt.norm"] == tuple(NORMS)
    assert options["maskfeat.gradient"] == GRADIENTS
    assert options["llava.conversation"] == CONVERSATIONS


@pytest.mark.parametrize("kind", ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp12x_gelu", "mlp0x_gelu", "mlp01x_gelu",
                                  "mlpx_gelu", "Linear", "mlp2x_relu", ""])  # fmt: skip
def test_projector_kinds_are_one_pattern_in_config_and_constructor(kind):
    accepted = re.fullmatch(PROJECTOR_PATTERN, kind) is not None
    try:
        C.load("mae_demo", [f"llava.projector={kind}"])
        config_ok = True
    except C.ConfigError:
        config_ok = False
    try:
        Projector(kind, 4, 4)
        constructor_ok = True
    except ValueError:
        constructor_ok = False
    assert accepted == config_ok == constructor_ok
    assert accepted == (kind in ("linear", "mlp1x_gelu", "mlp2x_gelu", "mlp12x_gelu"))


def test_full_checks_apply_to_the_objective_in_use_only():
    assert C.load("mae_demo").llava.decoder is None  # another objective's required key may stay empty
    with pytest.raises(C.ConfigError, match=r"'llava\.decoder': required"):
        C.load("mae_demo", ["objective=llava"])
    missing = ["clip.pretrained=/nonexistent/open_clip.bin"]
    assert C.load("mae_demo", missing)  # a file of an unused section is not looked for
    with pytest.raises(C.ConfigError, match=r"'clip\.pretrained': not an existing local file"):
        C.load("clip_demo", missing)


def test_the_igpt_palette_is_required_for_training_only():
    cfg = C.load("igpt_demo", ["igpt.palette=null"])  # --print-config and checkpoints need no palette file
    assert factory.build_objective(cfg) is not None
    with pytest.raises(C.ConfigError, match=r"'igpt\.palette': required for training.*fit_palette"):
        factory.build_datamodule(cfg)
