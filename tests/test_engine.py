"""The merge -> compute -> unmerge engine on real LiteMedSAM (TinyViT) and a small SAM ViT."""

import numpy as np
import pytest
import torch

import structsam.merge as merge
from structsam.errors import MergeError
from structsam.patching import merge_state, patch, unpatch


@pytest.fixture()
def identity_method():
    """A method that merges nothing: every token is its own group, through the merged path."""

    def identity(feat, grid, rate, protect, generator=None):
        b = feat.shape[0]
        idx = torch.arange(grid.n).expand(b, -1)
        return idx, torch.ones(b, grid.n, dtype=torch.bool)

    merge.METHODS["identity"] = merge.MethodInfo("identity", identity, 0.9, True, "none")
    yield "identity"
    del merge.METHODS["identity"]


def _image(size=256, seed=0):
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    img = resize(shepp_logan_phantom(), (size, size), order=1)
    x = torch.from_numpy(np.stack([img] * 3)).float()[None]
    return (x - x.min()) / (x.max() - x.min())


@pytest.fixture(scope="module")
def phantom():
    return _image()


def _run(encoder, x):
    with torch.inference_mode():
        return encoder(x)


def test_rate_zero_is_identical(litemedsam, phantom):
    enc = litemedsam.image_encoder
    ref = _run(enc, phantom)
    patch(litemedsam, "structsam", 0.0)
    try:
        assert torch.equal(_run(enc, phantom), ref)
        assert merge_state(litemedsam).info == []
    finally:
        unpatch(litemedsam)


def test_identity_plan_reproduces_tinyvit(litemedsam, phantom, identity_method):
    # every block through the reduced path with nothing merged: checks the packed windowed
    # attention, the learned attention biases, the padding keys and the recovery
    enc = litemedsam.image_encoder
    ref = _run(enc, phantom)
    patch(litemedsam, identity_method, 0.5)
    try:
        out = _run(enc, phantom)
        assert len(merge_state(litemedsam).info) == 10
    finally:
        unpatch(litemedsam)
    assert (out - ref).abs().max().item() < 1e-4


def test_identity_plan_reproduces_sam_vit(small_vit, identity_method):
    # windowed blocks with padding (16 tokens, window 6) and global blocks with relative positions
    x = torch.randn(1, 3, 256, 256)
    ref = _run(small_vit, x)
    patch(small_vit, identity_method, 0.5)
    try:
        out = _run(small_vit, x)
        windows = [i.window for i in merge_state(small_vit).info]
    finally:
        unpatch(small_vit)
    assert windows == [6, None, 6, None]
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("rate", [0.1, 0.4, 0.7])
def test_full_resolution_and_counts_tinyvit(litemedsam, phantom, rate):
    enc = litemedsam.image_encoder
    ref = _run(enc, phantom)
    patch(litemedsam, "structsam", rate, coarse=0)
    try:
        out = _run(enc, phantom)
        info = merge_state(litemedsam).info
    finally:
        unpatch(litemedsam)
    assert out.shape == ref.shape == (1, 256, 64, 64)
    assert torch.isfinite(out).all()
    assert [i.block for i in info] == list(range(10))
    for i in info:
        mmap = i.merge_map
        assert mmap.shape == i.grid_shape
        # the merge map has exactly one id per kept token
        assert len(np.unique(mmap)) == i.tokens_after
        removed = 1 - i.tokens_after / i.tokens_before
        # at most one token per 2x2 cell survives (cells are cut short at window edges)
        grid = merge.Grid(*i.grid_shape, i.plan.grid.window or None)
        capacity = 1 - int((grid.cell_count > 0).sum()) / grid.n
        assert removed <= rate + 1e-3
        assert removed >= min(rate, capacity) - 0.02
        # protected tokens are never merged: their ids are unique
        ids, counts = np.unique(mmap, return_counts=True)
        sizes = dict(zip(ids, counts, strict=True))
        assert all(sizes[g] == 1 for g in mmap[i.protected])
        # a group never spans two windows
        h, w = i.grid_shape
        win = i.window or max(h, w)
        wid = (np.arange(h)[:, None] // win) * 100 + np.arange(w)[None] // win
        for g in ids[counts > 1][:50]:
            assert len(np.unique(wid[mmap == g])) == 1


def test_sam_vit_merges_every_block(small_vit):
    x = torch.randn(1, 3, 256, 256)
    ref = _run(small_vit, x)
    patch(small_vit, "structsam", 0.5, coarse=0)
    try:
        out = _run(small_vit, x)
        info = merge_state(small_vit).info
    finally:
        unpatch(small_vit)
    assert out.shape == ref.shape
    assert [i.tokens_after for i in info] == [128] * 4
    # one assignment per stage (up to a global block): blocks 0 and 1 share their groups
    assert np.array_equal(info[0].merge_map, info[1].merge_map)


def test_prompt_region_is_protected(litemedsam, phantom):
    box = np.array([100.0, 90.0, 160.0, 170.0])  # model-input pixels (256 x 256)
    patch(litemedsam, "structsam", 0.6, prompts={"box": box})
    try:
        _run(litemedsam.image_encoder, phantom)
        info = merge_state(litemedsam).info
    finally:
        unpatch(litemedsam)
    for i in info:
        h, w = i.grid_shape
        s = h / 256
        y0, y1 = int(box[1] * s) + 1, int(box[3] * s) - 1
        x0, x1 = int(box[0] * s) + 1, int(box[2] * s) - 1
        inside = i.protected[y0:y1, x0:x1]
        assert inside.all()
        mmap = i.merge_map
        _, counts = np.unique(mmap, return_counts=True)
        assert len(counts) == i.tokens_after


def test_unpatch_restores_model(litemedsam, phantom):
    enc = litemedsam.image_encoder
    classes = [type(m) for m in enc.modules()]
    ref = _run(enc, phantom)
    patch(litemedsam, "structsam", 0.5)
    patch(litemedsam, "structsam", 0.3)  # patching twice replaces the first patch
    assert merge_state(litemedsam).rates[0] == 0.3
    unpatch(litemedsam)
    assert [type(m) for m in enc.modules()] == classes
    assert not any(hasattr(m, "_structsam_state") for m in enc.modules())
    assert torch.equal(_run(enc, phantom), ref)


def test_bad_settings_raise_clear_errors(litemedsam):
    with pytest.raises(MergeError, match="rate must be in"):
        patch(litemedsam, "structsam", 1.2)
    with pytest.raises(MergeError, match="at most 75%"):
        patch(litemedsam, "structsam", 0.9)
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        patch(litemedsam, "nope", 0.3)
    with pytest.raises(MergeError, match="do not exist"):
        patch(litemedsam, "structsam", 0.3, blocks=[42])
    unpatch(litemedsam)


def test_schedule_and_block_choice(litemedsam, phantom):
    # blocks 2 and 3 share a stage and one assignment, so they cannot have two rates
    with pytest.raises(MergeError, match="share one merge"):
        patch(litemedsam, "structsam", {2: 0.5, 3: 0.25}, blocks=[2, 3], coarse=0)
    unpatch(litemedsam)
    ref = _run(litemedsam.image_encoder, phantom)
    patch(litemedsam, "structsam", 0.5, blocks=[2, 3], coarse=0)
    try:
        out = _run(litemedsam.image_encoder, phantom)
        info = merge_state(litemedsam).info
    finally:
        unpatch(litemedsam)
    # blocks 4-7 of the same stage run dense after the merged run
    assert [i.block for i in info] == [2, 3]
    assert 0 < (out - ref).abs().max().item() < ref.abs().max().item()
    assert info[0].tokens_after == info[1].tokens_after == 2048


@pytest.mark.parametrize("encoder", ["tinyvit", "vit"])
def test_identity_plan_with_full_queries(encoder, litemedsam, small_vit, phantom, identity_method):
    model = litemedsam if encoder == "tinyvit" else small_vit
    x = phantom if encoder == "tinyvit" else torch.randn(1, 3, 256, 256)
    enc = getattr(model, "image_encoder", model)
    ref = _run(enc, x)
    patch(model, identity_method, 0.5, queries="full")
    try:
        out = _run(enc, x)
    finally:
        unpatch(model)
    assert (out - ref).abs().max().item() < 1e-4


def test_coarse_cells_merge_wide_flat_areas_further(litemedsam, phantom):
    kept = {}
    for coarse in (0, 1):
        patch(litemedsam, "structsam", 0.5, coarse=coarse)
        try:
            _run(litemedsam.image_encoder, phantom)
            info = merge_state(litemedsam).info
        finally:
            unpatch(litemedsam)
        kept[coarse] = [i.tokens_after for i in info]
        for i in info:  # still one id per kept token, protected tokens alone
            mmap = i.merge_map
            assert len(np.unique(mmap)) == i.tokens_after
    assert all(a < b for a, b in zip(kept[1], kept[0], strict=True))


@pytest.mark.parametrize("rate", [0.3, 0.6])
def test_one_merge_per_stage_equals_per_block(small_vit, rate):
    # merge(x + unmerge(u)) == merge(x) + u: merging once per stage is the per-block path
    from structsam.patching import sam_vit

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    out, paths, kept = {}, {}, {}
    for recovery in ("stage", "block"):
        patch(small_vit, "structsam", rate, coarse=0, recovery=recovery)
        try:
            paths[recovery] = type(small_vit).forward
            out[recovery] = _run(small_vit, x)
            kept[recovery] = [i.tokens_after for i in merge_state(small_vit).info]
        finally:
            unpatch(small_vit)
    assert kept["stage"] == kept["block"] and max(kept["stage"]) < 256
    assert paths["stage"] is sam_vit.encoder_forward
    assert paths["block"] is not sam_vit.encoder_forward
    assert (out["stage"] - out["block"]).abs().max().item() < 1e-4


def test_tinyvit_stage_path_equals_per_block(litemedsam, phantom):
    # one merge and one recovery per block around the full-resolution conv equals merging
    # around attention and MLP separately; only stage 2 (six blocks) merges, so a float-level
    # difference cannot flip a later stage's selection
    from structsam.patching import tinyvit

    out, paths, kept = {}, {}, {}
    for recovery in ("stage", "block"):
        patch(litemedsam, "structsam", {b: 0.4 for b in range(2, 8)}, recovery=recovery)
        try:
            paths[recovery] = type(litemedsam.image_encoder).forward
            out[recovery] = _run(litemedsam.image_encoder, phantom)
            kept[recovery] = [i.tokens_after for i in merge_state(litemedsam).info]
        finally:
            unpatch(litemedsam)
    assert paths["stage"] is tinyvit.encoder_forward
    assert paths["block"] is not tinyvit.encoder_forward
    assert kept["stage"] == kept["block"] and len(kept["stage"]) == 6
    assert max(kept["stage"]) < 64 * 64
    assert (out["stage"] - out["block"]).abs().max().item() < 1e-4


def test_lean_dense_vit_equals_stock(small_vit):
    # rate 0 runs SAM ViT through the fused attention with folded relative positions
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    ref = _run(small_vit, x)
    patch(small_vit, "structsam", 0.0)
    try:
        out = _run(small_vit, x)
    finally:
        unpatch(small_vit)
    assert (out - ref).abs().max().item() < 1e-4


def test_one_stage_one_rate(small_vit):
    # blocks 0 and 1 form one stage (1 is global): the engine merges them once
    with pytest.raises(MergeError, match="share one merge"):
        patch(small_vit, "structsam", [0.3, 0.5, 0.3, 0.3])
    unpatch(small_vit)
    patch(small_vit, "structsam", [0.3, 0.5, 0.3, 0.3], recovery="block")
    unpatch(small_vit)


@pytest.mark.parametrize("method", sorted(merge.METHODS))
def test_every_method_leaves_protected_tokens_alone(method, litemedsam, phantom):
    # the engine's prompt protection: no protected token is a source or a destination
    box = np.array([100.0, 90.0, 160.0, 170.0])  # model-input pixels (256 x 256)
    info = merge.get_method(method)
    patch(litemedsam, method, min(0.4, info.max_rate), prompts={"box": box})
    try:
        _run(litemedsam.image_encoder, phantom)
        blocks = merge_state(litemedsam).info
    finally:
        unpatch(litemedsam)
    assert blocks
    for i in blocks:
        grid = i.plan.grid
        protect = merge.prompt_mask(grid, 256, {"box": box}).reshape(-1)
        group = i.plan.group.view(-1)
        sizes = torch.bincount(group)
        assert (sizes[group[protect]] == 1).all()  # alone in their groups
        assert i.protected.reshape(-1)[protect.numpy()].all()
    assert any(i.tokens_after < i.tokens_before for i in blocks)


def test_merge_attention_false_is_honoured_for_sam_vit(small_vit):
    """Attention on every token, only the MLP merged: costs more than merging both, less than
    none, and gives another output than the default (it used to be ignored for SAM ViT)."""
    from torch.utils.flop_counter import FlopCounterMode

    from structsam.patching import merge_config

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))

    def run(**options):
        patch(small_vit, "structsam", 0.5, **options)
        try:
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                out = small_vit(x)
            return out, counter.get_total_flops(), merge_config(small_vit)
        finally:
            unpatch(small_vit)

    both, flops_both, _ = run()
    mlp_only, flops_mlp, config = run(merge_attention=False)
    dense, flops_dense, _ = run(recovery="block", merge_mlp=False, merge_attention=False)
    assert config.merge_attention is False and config.identity()["merge_attention"] is False
    assert flops_both < flops_mlp < flops_dense
    assert not torch.allclose(both, mlp_only)


def test_patched_restores_the_earlier_patch(small_vit):
    from structsam.patching import merge_config, patched

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    patch(small_vit, "tome", 0.3)
    before = merge_config(small_vit)
    ref = _run(small_vit, x)
    with patched(small_vit, "structsam", 0.5):
        assert merge_config(small_vit).method.name == "structsam"
    assert merge_config(small_vit) is before and torch.equal(_run(small_vit, x), ref)
    unpatch(small_vit)
    with patched(small_vit, "structsam", 0.5):
        pass
    assert merge_config(small_vit) is None and type(small_vit).__name__ == "ImageEncoderViT"


@pytest.mark.parametrize(
    "dtype, slots, pad_fp32, kernel",
    [
        (torch.float32, 40, False, "fused"),
        (torch.float32, 40, False, "explicit"),
        (torch.bfloat16, 40, False, "explicit"),
        (torch.float32, 530, True, "fused"),
        (torch.bfloat16, 530, False, "fused"),
    ],
)
def test_folded_attention_pads_to_aligned_shapes_exactly(
    dtype, slots, pad_fp32, kernel, monkeypatch
):
    # the kernel is given a width padded to 32 and, in bf16, a long window padded to 64 tokens
    # with empty keys: the result must be the explicit softmax(q k * scale + rel-pos + log size)
    # (the token padding forced in fp32 too, where it can be checked tightly), whichever kernel
    # short windows run on here
    from types import SimpleNamespace

    from structsam.patching import kernels, sam_vit
    from structsam.patching.sam_vit import _fold_layout, _folded_attention

    monkeypatch.setattr(kernels, "_pinned", kernel)
    if pad_fp32:
        monkeypatch.setattr(sam_vit, "_extra_tokens", lambda s, dtype: -s % 64)

    torch.manual_seed(0)
    size, heads, hd = 24, 2, 16
    attn = SimpleNamespace(
        use_rel_pos=True,
        rel_pos_h=torch.randn(2 * size - 1, hd).to(dtype),
        rel_pos_w=torch.randn(2 * size - 1, hd).to(dtype),
        scale=hd**-0.5,
    )
    pos = torch.randperm(size * size)[:slots].sort().values[None]
    log_size = torch.rand(1, slots).mul(2).log1p()
    log_size[0, -3:] = float("-inf")  # empty slots
    part = {"pos": pos, "key_bias": log_size[:, None, None, :]}
    q, k, v = (torch.randn(1, heads, slots, hd).to(dtype) for _ in range(3))
    with torch.inference_mode():  # as encoders run (autograd keeps the fused kernel)
        out = _folded_attention(attn, q, k, v, _fold_layout(part, size, dtype))

    r, c = pos[0] // size, pos[0] % size
    rh = attn.rel_pos_h.float()[r[:, None] - r[None] + size - 1]  # (S, S, hd)
    rw = attn.rel_pos_w.float()[c[:, None] - c[None] + size - 1]
    qf, kf, vf = q.float(), k.float(), v.float()
    logits = qf @ kf.transpose(-1, -2) * attn.scale
    logits = logits + torch.einsum("bhqd,qkd->bhqk", qf, rh + rw)
    ref = (logits + log_size[:, None, None, :]).softmax(-1) @ vf  # (1, heads, S, hd)
    assert out.shape == (1, slots, heads, hd)
    err = (out.float() - ref.transpose(1, 2)).abs()
    if dtype == torch.float32:
        assert err.max() < 1e-4
    else:  # bf16 rounding of q, k and the scores
        assert err.mean() < 5e-3 and err.max() < 0.1
