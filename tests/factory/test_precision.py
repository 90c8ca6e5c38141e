"""trainer.precision=auto (mmssl/factory/precision.py): bf16-mixed on CPUs with native bf16, 32-true on AVX2-only
CPUs, a warning for an explicit bf16 there, and the resolved value reaching Lightning's Trainer."""

import warnings

import pytest

from mmssl import config as C
from mmssl import factory
from mmssl.config import finetune as F
from mmssl.factory import finetune as FT
from mmssl.factory import precision

# /proc/cpuinfo "flags" of the two kinds of machine in issue 17 (abridged to the vector extensions)
AVX2_ONLY = (
    "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni vaes vpclmulqdq"  # EPYC, family 25
)
AVX512_BF16 = AVX2_ONLY + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16"  # EPYC, family 26


def fake_cpu(monkeypatch, flags: str) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags.split()))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_ONLY, "32-true"), (AVX512_BF16, "bf16-mixed"), (AVX2_ONLY + " amx_bf16 amx_tile", "bf16-mixed")],
)
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch, flags, expected):
    fake_cpu(monkeypatch, flags)
    chosen, why = precision.resolve_precision("auto", "cpu")
    assert chosen == expected
    assert ("no native bf16" in why) == (expected == "32-true")


def test_explicit_bf16_on_a_cpu_without_it_warns_and_is_kept(monkeypatch):
    fake_cpu(monkeypatch, AVX2_ONLY)
    with pytest.warns(UserWarning, match="trainer.precision=bf16-mixed on a CPU without native bf16"):
        assert precision.resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
    fake_cpu(monkeypatch, AVX512_BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
        fake_cpu(monkeypatch, AVX2_ONLY)
        assert precision.resolve_precision("32-true", "cpu")[0] == "32-true"


def test_cpu_flags_reads_the_flags_line(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: {AVX2_ONLY}\n\n"
    )
    monkeypatch.setattr(precision, "CPUINFO", info)
    assert precision.cpu_flags() == frozenset(AVX2_ONLY.split())
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert precision.cpu_flags() == frozenset()  # not Linux: no flags, so auto stays in fp32
    assert precision.resolve_precision("auto", "cpu")[0] == "32-true"


def test_auto_is_the_default_and_build_trainer_resolves_it(monkeypatch, tmp_path, capsys):
    cfg = C.load("mae_demo", [f"out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.precision=auto"])
    assert C.load("mae_vitb").trainer.precision == "auto"  # the recipes no longer force bf16
    plan = factory.Plan(1, 8, 1e-3, 10, 10, 1)
    for flags, expected in ((AVX2_ONLY, "32-true"), (AVX512_BF16, "bf16-mixed")):
        fake_cpu(monkeypatch, flags)
        trainer = factory.build_trainer(cfg, plan)
        assert trainer.precision == expected
        assert f"mmssl: precision {expected} (auto: the CPU" in capsys.readouterr().out


def test_fine_tuning_defaults_to_auto_and_resolves_it(monkeypatch, tmp_path, capsys):
    """The fine-tune tool shares the pretraining trainer's arguments: ``auto`` by default (it forced bf16-mixed,
    emulated and several times slower on AVX2-only CPUs), resolved before Lightning sees it."""
    assert F.load("finetune_mae_vitb").trainer.precision == "auto"
    cfg = F.load(
        "finetune_digits", [f"out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.precision=auto"]
    )
    plan = factory.Plan(1, 8, 1e-3, 10, 10, 1)
    for flags, expected in ((AVX2_ONLY, "32-true"), (AVX512_BF16, "bf16-mixed")):
        fake_cpu(monkeypatch, flags)
        assert FT.build_trainer(cfg, plan).precision == expected
        assert f"mmssl: precision {expected} (auto: the CPU" in capsys.readouterr().out
