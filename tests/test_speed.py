"""structsam speed (mechanics only: timings are for the CLI, not for tests) and torch.compile."""

from pathlib import Path

import numpy as np
import pytest
import torch

from structsam.patching import patch, unpatch
from structsam.speed import Variant, speed_table, summarize


def test_speed_ups_are_against_the_fastest_dense_of_the_same_precision():
    v = [
        Variant("published", "fp32", False, times=[4.0]),
        Variant("stock", "fp32", False, times=[2.0]),
        Variant("lean", "fp32", False, times=[1.0], flops=90),
        Variant("merged -30%", "fp32", True, rate=0.3, flops=63, times=[0.5, 0.7, 0.6]),
        Variant("stock", "bf16", False, times=[3.0]),
        Variant("lean", "bf16", False, times=[4.0]),
        Variant("merged -30%", "bf16", True, rate=0.3, flops=63, times=[2.0]),
    ]
    rows = {(r["name"], r["precision"]): r for r in summarize(v, dense_flops=90)}
    assert rows[("merged -30%", "fp32")]["vs_fastest_dense"] == pytest.approx(1.0 / 0.6)
    assert rows[("merged -30%", "fp32")]["spread"] == (0.5, 0.7)
    assert rows[("merged -30%", "bf16")]["vs_fastest_dense"] == pytest.approx(1.5)  # stock
    assert rows[("merged -30%", "bf16")]["vs_published"] == pytest.approx(2.0)
    assert rows[("merged -30%", "fp32")]["flops_cut"] == pytest.approx(0.3)
    table = speed_table({"models": {"m": list(rows.values())}})
    assert "| merged -30% | fp32 | no | 0.300 |" in table


@pytest.mark.slow
def test_speed_command_smoke(tmp_path):
    from structsam.cli import main

    out = tmp_path / "speed"
    args = ["speed", "--models", "litemedsam", "--cuts", "0.3", "--precisions", "fp32"]
    assert main([*args, "--rounds", "1", "--out", str(out)]) == 0
    text = (out / "speed.md").read_text()
    for name in ("published", "shipped default", "stock", "lean", "merged -30%"):
        assert f"| {name}" in text
    # glibc here: the allocator is held steady unless asked otherwise, and the table says so
    # and the OpenMP wait policy, which napari_structsam sets for napari alone
    assert "**litemedsam** (allocator: steady; OMP_WAIT_POLICY: " in text
    # ratios depend on the chip and on which attention kernel won there: both are named
    assert "fp32 windows: fused kernel" in text or "fp32 windows: explicit products" in text
    if Path("/proc/cpuinfo").exists():
        assert "(no bf16 instructions)" in text or "bf16)" in text


def test_speed_refuses_a_method_spec_before_loading_a_model(capsys, tmp_path):
    from structsam.cli import main

    args = ["speed", "--method", "structsam[screen=2]", "--out", str(tmp_path / "s")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "speed times a method by name" in err and "Traceback" not in err


def test_steady_allocator_takes_effect_under_glibc():
    import platform

    from structsam.speed import speed_report, steady_allocator

    glibc = platform.libc_ver()[0] == "glibc"
    assert steady_allocator() is glibc
    with pytest.raises(ValueError, match="allocator must be 'steady' or 'default'"):
        speed_report(models=(), allocator="jemalloc")


@pytest.mark.slow
def test_compiled_merged_encoder_gives_the_eager_result(small_vit):
    # the merged path compiles (graph breaks where the plan is built) and agrees with eager
    # for two different images, i.e. two different merge plans
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 3, 256, 256, generator=gen) for _ in range(2)]
    patch(small_vit, "structsam", 0.4)
    try:
        with torch.inference_mode():
            ref = [small_vit(x) for x in xs]
            compiled = torch.compile(small_vit)
            out = [compiled(x) for x in xs]
    finally:
        torch._dynamo.reset()
        unpatch(small_vit)
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert not torch.equal(ref[0], ref[1])
