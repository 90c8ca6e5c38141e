"""FSDP wiring (factory/fsdp.py) and gradient checkpointing, on CPU.

Lightning runs FSDP on CUDA only, so the unit tests check what mmssl hands it (wrapped block classes, keys ->
FSDPStrategy arguments, the refusal on CPU) and wrap objectives with torch's own FSDP on a one-process gloo
group; the slow tests run the real CLI under Lightning's FSDPStrategy on two CPU processes (tests/factory/fsdp_worker.py).
The 1-GPU run belongs to benchmarks/gpu_check.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from open_clip.transformer import ResidualAttentionBlock
from safetensors.torch import load_file
from timm.models.vision_transformer import Block, ParallelThingsBlock
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from mmssl import config as C
from mmssl import factory
from mmssl.backbones import create_backbone
from mmssl.factory import block_classes, build_objective, fsdp_kwargs
from mmssl.optim import param_groups

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vlm"))
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402
from llava_helpers import make_llava, tokenizer  # noqa: E402

TINY_VIT = ["backbone.img_size=32", "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=2",
            "backbone.num_heads=2"]  # fmt: skip
TINY_MAE = [*TINY_VIT, "mae.decoder_embed_dim=32", "mae.decoder_depth=1", "mae.decoder_num_heads=2"]


def mae_cfg(*overrides: str):
    return C.load("mae_demo", [*TINY_MAE, *overrides])


def count(module: nn.Module, cls: type | tuple) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


# --- which classes become FSDP units -------------------------------------------------------------------------


def test_mae_wraps_the_encoder_and_decoder_blocks():
    objective = build_objective(mae_cfg())
    assert block_classes(objective) == {Block}
    assert count(objective, Block) == 2 + 1  # backbone.depth + mae.decoder_depth


def test_clip_wraps_open_clip_blocks_of_both_towers():
    cfg = C.load("clip_demo", ["clip.image_tower=open_clip", "clip.vision_cfg.layers=1",
                               "clip.vision_cfg.width=32", "clip.vision_cfg.head_width=16", "clip.vision_cfg.patch_size=16", "clip.text_cfg.width=32",
                               "clip.text_cfg.heads=2", "clip.text_cfg.layers=1"])  # fmt: skip
    objective = build_objective(cfg)
    assert block_classes(objective) == {ResidualAttentionBlock}
    assert count(objective.image_tower, ResidualAttentionBlock) == 1  # the image tower's own block is found
    with_vit = build_objective(C.load("clip_demo", [*TINY_VIT, "clip.text_cfg.layers=1"]))
    assert block_classes(with_vit) == {Block, ResidualAttentionBlock}  # timm image tower, open_clip text


def test_llava_wraps_the_decoder_layers_named_by_transformers_and_the_vision_blocks():
    model = make_llava(tokenizer(), train_decoder=True)
    assert model.decoder._no_split_modules  # transformers' own list, not a name written in mmssl
    assert block_classes(model) == {LlamaDecoderLayer, Block}
    assert count(model, LlamaDecoderLayer) == 2


def test_igpt_wraps_its_transformer_blocks():
    objective = build_objective(C.load("igpt_demo", ["igpt.depth=2", "igpt.embed_dim=32"]))
    assert block_classes(objective) == {Block} and count(objective, Block) == 2


def test_any_timm_vit_block_and_declared_blocks_are_found():
    vit = create_backbone("vit_small_patch16_18x2_224", img_size=32, embed_dim=32, depth=2, num_heads=2)
    assert block_classes(vit) == {ParallelThingsBlock}  # from VisionTransformer.blocks, not a known class

    class Layer(nn.Linear):
        pass

    class Declared(nn.Module):
        _no_split_modules = ["Layer"]

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(2, 2), Layer(2, 2)])

    assert block_classes(Declared()) == {Layer}


def test_a_model_without_blocks_is_refused_naming_the_key():
    cfg = C.load("simclr_digits", ["trainer.strategy=fsdp", "optim.name=adamw"])  # a ResNet-18
    with pytest.raises(C.ConfigError, match=r"trainer\.strategy.*no transformer block.*ddp"):
        fsdp_kwargs(cfg, build_objective(cfg))


# --- config keys -> FSDPStrategy ------------------------------------------------------------------------------


def test_keys_become_strategy_arguments():
    objective = build_objective(mae_cfg())
    default = FSDPStrategy(**fsdp_kwargs(mae_cfg("trainer.strategy=fsdp"), objective))
    assert default.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert isinstance(default.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert default.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert default._activation_checkpointing_kwargs == {} and not default.cpu_offload.offload_params
    assert default._state_dict_type == "full" and default.kwargs["use_orig_params"]

    cfg = mae_cfg("trainer.strategy=fsdp", "trainer.fsdp.sharding_strategy=hybrid_shard",
                  "trainer.fsdp.activation_checkpointing=true", "trainer.fsdp.cpu_offload=true",
                  "trainer.ddp_timeout_s=60")  # fmt: skip
    s = FSDPStrategy(**fsdp_kwargs(cfg, objective))
    assert s.sharding_strategy == ShardingStrategy.HYBRID_SHARD
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert s.cpu_offload.offload_params and s._timeout.total_seconds() == 60
    assert s._state_dict_type == "full"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["trainer.strategy=fsdp", "trainer.fsdp.sharding_strategy=ZERO3"], "trainer.fsdp.sharding_strategy"),
        (["trainer.strategy=fsdp", "optim.name=lars"], "optim.name"),
        (["trainer.strategy=fsdp", "backbone.grad_checkpointing=true"], "backbone.grad_checkpointing"),
        (["trainer.strategy=fsdp", "eval.online_probe=true", "eval.num_classes=10"], "eval.online_probe"),
    ],
)
def test_bad_fsdp_settings_name_their_key(overrides, key):
    with pytest.raises(C.ConfigError, match=f"'{key}'"):
        mae_cfg(*overrides)


# --- refused on CPU, before any model or data work ------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_fsdp_on_a_cpu_machine_is_refused_naming_the_key(accelerator):
    cfg = mae_cfg("trainer.strategy=fsdp", f"trainer.accelerator={accelerator}")
    with pytest.raises(C.ConfigError, match=r"trainer\.strategy.*CUDA"):
        C.validate_machine(cfg)
    with pytest.raises(C.ConfigError, match=r"trainer\.strategy.*CUDA"):  # library users get it too
        factory.build_trainer(cfg, factory.Plan(1, 64, 1e-3, 10, 10, 0), objective=build_objective(cfg))
    # a checkpoint's config of an FSDP run still loads on this machine
    assert C.from_dict(C.to_dict(cfg)).trainer.strategy == "fsdp"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_the_cli_refuses_fsdp_before_data_or_model_work(tmp_path, monkeypatch, capsys):
    def no_work(cfg):
        raise AssertionError("data work started")

    monkeypatch.setattr(factory, "build_datamodule", no_work)
    code = pretrain.main(["--cfg", "mae_demo", "trainer.strategy=fsdp", f"out_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "trainer.strategy" in err and "CUDA" in err and "Traceback" not in err


# --- the wrapping itself, with torch's FSDP on one CPU process ------------------------------------------------


@pytest.fixture
def gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_block_becomes_a_unit_with_checkpointing_and_the_same_loss(gloo):
    cfg = mae_cfg("trainer.strategy=fsdp", "trainer.fsdp.activation_checkpointing=true")
    plain = build_objective(cfg)
    objective = build_objective(cfg)
    objective.load_state_dict(plain.state_dict())
    kwargs = fsdp_kwargs(cfg, objective)
    # what Lightning's FSDPStrategy does with these arguments (strategies/fsdp.py _setup_model)
    model = FullyShardedDataParallel(
        objective, auto_wrap_policy=ModuleWrapPolicy(kwargs["auto_wrap_policy"]), use_orig_params=True,
        device_id=torch.device("cpu"),
    )  # fmt: skip
    policy = ModuleWrapPolicy(kwargs["activation_checkpointing_policy"])
    apply_activation_checkpointing(model, auto_wrap_policy=policy)
    assert count(model, FullyShardedDataParallel) == 3 + 1  # one unit per block, and the root
    assert count(model, CheckpointWrapper) == 3

    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    ref = plain({"image": images})["loss"]
    ref.backward()
    torch.manual_seed(1)
    loss = model({"image": images})["loss"]
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
        wrapped = {
            n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): p.grad
            for n, p in objective.named_parameters()
            if p.requires_grad
        }
        assert wrapped.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(wrapped[name], grad, rtol=0, atol=1e-6, msg=name)


# --- backbone.grad_checkpointing (no FSDP) --------------------------------------------------------------------


def block_calls(module: nn.Module) -> list[int]:
    """Counts block calls as they start (a recomputation may stop early, before a forward hook would run)."""
    calls = [0]
    for m in module.modules():
        if isinstance(m, Block):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("path", ["mae", "pooled"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(path):
    """MAE's visible-token encoder (ViTBackbone.encode) and timm's own forward_features, drop path on."""
    results = {}
    for on in (False, True):
        torch.manual_seed(0)
        cfg = mae_cfg(f"backbone.grad_checkpointing={on}", "backbone.drop_path_rate=0.2")
        objective = build_objective(cfg)
        assert objective.backbone.model.grad_checkpointing is on
        calls = block_calls(objective.backbone)
        torch.manual_seed(1)
        images = torch.randn(4, 3, 32, 32)
        if path == "mae":
            loss = objective({"image": images})["loss"]
        else:
            loss = objective.backbone.forward_pooled(images).square().mean()
        forward_calls = calls[0]
        loss.backward()
        # checkpointing runs every encoder block once more in the backward pass; without it, never
        assert calls[0] == forward_calls * (2 if on else 1) and forward_calls == 2
        results[on] = (
            loss.detach(),
            {n: p.grad for n, p in objective.named_parameters() if p.grad is not None},
        )
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads1.keys() == grads0.keys() and len(grads0) > 10
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-6, msg=name)


def test_grad_checkpointing_on_a_model_without_it_names_the_key():
    cfg = C.load("simclr_digits", ["backbone.name=dla46_c", "backbone.grad_checkpointing=true"])
    with pytest.raises(C.ConfigError, match=r"backbone\.grad_checkpointing.*dla46_c"):
        factory.build_backbone(cfg)


# --- the real thing: tools/pretrain.py under Lightning's FSDPStrategy, 2 CPU processes ------------------------


def worker(args: list[str], demo_root: str, timeout: int = 300) -> None:
    env = {**os.environ, "MMSSL_DATA": demo_root, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tests" / "factory" / "fsdp_worker.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, f"{args}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


RUN = ["data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=32", "data.val_shards=null",
       "trainer.devices=2", "trainer.strategy=fsdp", "trainer.log_every_n_steps=1", "optim.warmup_steps=1"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mae_under_fsdp_saves_full_checkpoints_that_load_anywhere_and_resume(tmp_path, demo_root):
    common = ["--cfg", "mae_demo", *TINY_MAE, *RUN, "trainer.fsdp.activation_checkpointing=true",
              "trainer.gradient_clip_val=1.0", f"out_dir={tmp_path}"]  # fmt: skip
    worker([*common, "name=a", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2"], demo_root)
    ckpt_dir = tmp_path / "a" / "checkpoints"
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4

    # full tensors under the plain objective's names: the checkpoint loads without FSDP
    plain = build_objective(mae_cfg())
    state = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    loaded, _ = factory.objective_from_checkpoint(ckpt_dir / "last.ckpt")
    torch.testing.assert_close(loaded.state_dict(), state)
    backbone, _ = factory.load_encoder(ckpt_dir / "last.ckpt")  # what export and evaluation read
    assert backbone.embed_dim == 32

    # the optimizer's groups were taken before FSDP flattened the weights: 2-D weights still decay
    groups = param_groups(plain, "adamw", 0.05)
    want = sorted((g["weight_decay"], len(g["params"])) for g in groups)
    got = sorted((g["weight_decay"], len(g["params"])) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert got == want and want[-1][0] == 0.05 and want[-1][1] > 0

    # resume from the step-2 checkpoint in a fresh run directory: steps 3-4 again, optimizer state restored
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_bytes((ckpt_dir / "step0000002.ckpt").read_bytes())
    worker([*common, "name=b", "trainer.max_steps=4", "--resume"], demo_root)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in resumed["state_dict"].values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_llava_parts_under_fsdp_hold_the_gathered_weights(tmp_path, demo_root):
    env = {**os.environ, "MMSSL_DATA": demo_root, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_decoder.py"), "--texts", "demo:shapes/train", "--out",
         str(tmp_path / "llm"), "--hidden-size", "32", "--heads", "2"],
        env=env, check=True, capture_output=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    worker(["--cfg", "llava_demo_stage2", "llava.vision=backbone", "llava.projector_weights=null",
            f"llava.decoder={tmp_path / 'llm'}", "backbone.img_size=32", "backbone.patch_size=16",
            "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2", "data.img_size=32", *RUN,
            "trainer.max_steps=2", f"out_dir={tmp_path}", "name=l"], demo_root)  # fmt: skip
    run = tmp_path / "l"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    parts = {
        "projector.": load_file(str(run / "llava" / "projector.safetensors")),
        "vision.encoder.": load_file(str(run / "llava" / "vision.safetensors")),
        "decoder.": load_file(str(run / "llava" / "decoder" / "model.safetensors")),
    }
    for prefix, tensors in parts.items():
        key = f"objective.{prefix}"
        want = {k.removeprefix(key): v for k, v in state.items() if k.startswith(key)}
        assert tensors.keys() == want.keys(), prefix
        for name, tensor in tensors.items():
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=prefix + name)
