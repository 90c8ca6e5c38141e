"""Fully sharded data parallel through Lightning's ``FSDPStrategy`` (Zhao et al. 2023, "PyTorch FSDP:
Experiences on Scaling Fully Sharded Data Parallel"; ZeRO-3: Rajbhandari et al. 2020).

FSDP gathers the parameters of one *unit* at a time. Without an auto-wrap policy the whole model is one unit,
gathered whole for every forward and backward, so its peak memory is that of DDP; here every transformer block
of the objective is its own unit (PyTorch's FSDP tutorial, "Transformer Wrapping Policy"; Lightning's FSDP
guide wraps ``{nn.TransformerEncoderLayer}`` the same way). The block classes come from the objective itself,
never from its name:

* timm's ``Block`` (ViT encoders, the MAE decoder, iGPT's transformer) and the blocks of any timm
  ``VisionTransformer`` (whatever its ``block_fn``);
* open_clip's ``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock`` (CLIP towers);
* the classes any submodule names in ``_no_split_modules``: transformers' list of layers that must stay whole
  (``LlamaDecoderLayer`` for a Llama/Vicuna decoder); an objective may declare the attribute too.

Activation checkpointing, when asked for, wraps the same classes. Checkpoints hold full (gathered) state dicts
(``state_dict_type="full"``): ``last.ckpt`` has the same keys as a single-device run, so it resumes under any
strategy and export, evaluation and LLaVA parts read it unchanged.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mmssl import config as C

KNOWN_BLOCKS: tuple[type[nn.Module], ...] = (Block, ResidualAttentionBlock, CustomResidualAttentionBlock)


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The transformer-block classes inside ``module`` (see the module docstring); empty for a CNN."""
    modules = list(module.modules())
    by_name = {type(m).__name__: type(m) for m in modules}
    found = {type(m) for m in modules if isinstance(m, KNOWN_BLOCKS)}
    for m in modules:
        if isinstance(m, VisionTransformer):
            found |= {type(b) for b in m.blocks}
        found |= {by_name[n] for n in getattr(m, "_no_split_modules", None) or () if n in by_name}
    return found


def fsdp_kwargs(cfg: DictConfig, objective: nn.Module) -> dict[str, Any]:
    """``trainer.fsdp.*`` and the objective's blocks -> ``FSDPStrategy`` keyword arguments."""
    blocks = block_classes(objective)
    if not blocks:
        raise C.ConfigError(
            f"config key 'trainer.strategy': fsdp shards the objective block by block, but the "
            f"{type(objective).__name__} objective has no transformer block (known: "
            f"{', '.join(c.__name__ for c in KNOWN_BLOCKS)}, or classes named in _no_split_modules); "
            "use trainer.strategy=ddp"
        )
    f = cfg.trainer.fsdp
    return {
        "timeout": timedelta(seconds=cfg.trainer.ddp_timeout_s),
        "auto_wrap_policy": blocks,  # Lightning turns a set of classes into torch's ModuleWrapPolicy
        "activation_checkpointing_policy": blocks if f.activation_checkpointing else None,
        "sharding_strategy": f.sharding_strategy.upper(),
        "cpu_offload": f.cpu_offload,
        "state_dict_type": "full",  # rank 0 gathers every tensor: one file, loadable without FSDP
    }


def fsdp_strategy(cfg: DictConfig, objective: nn.Module) -> FSDPStrategy:
    C.validate_machine(cfg)  # CUDA GPUs, or a clear error instead of Lightning's traceback
    return FSDPStrategy(**fsdp_kwargs(cfg, objective))
