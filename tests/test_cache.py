"""The on-disk embedding cache: keys, hits without the encoder, eviction, damaged entries."""

import contextlib
import os

import numpy as np
import pytest
import torch

import structsam
from structsam.cache import (
    EmbeddingCache,
    default_cache_folder,
    embedding_key,
    parse_size,
    weights_identity,
)
from structsam.embedding import Embedding
from structsam.errors import StructSAMError
from structsam.samples import mni152_slice
from structsam.transforms import Geometry

BOX = np.array([40.0, 50.0, 110.0, 120.0])


@contextlib.contextmanager
def count_encodes(model):
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture
def merged(litemedsam):
    structsam.patch(litemedsam, "structsam", 0.3)
    yield litemedsam
    structsam.unpatch(litemedsam)


@pytest.fixture(scope="module")
def image():
    return mni152_slice("axial")


def test_second_set_image_is_served_from_the_cache(merged, image, tmp_path):
    cache = EmbeddingCache(tmp_path)
    first = structsam.Predictor(merged, cache=cache)
    with count_encodes(merged) as calls:
        first.set_image(image, window=(0.05, 0.9))
        assert len(calls) == 1 and not first.from_cache
        masks, scores, _ = first.predict(box=BOX)
        second = structsam.Predictor(merged, cache=cache)
        second.set_image(image.copy(), window=(0.05, 0.9))
        assert len(calls) == 1, "a cache hit must not run the encoder"
    assert second.from_cache and second.cache_key == first.cache_key
    assert first.cache_key == embedding_key(merged, image, window=(0.05, 0.9))
    masks2, scores2, _ = second.predict(box=BOX)
    np.testing.assert_array_equal(masks2, masks)
    np.testing.assert_array_equal(scores2, scores)
    assert torch.equal(second.features, first.features)
    assert second.geometry == first.geometry
    assert second.encode_seconds == first.encode_seconds
    # the overlays see the same merge diagnostics
    assert len(second.merge_info) == len(first.merge_info) == 10
    for a, b in zip(first.merge_info, second.merge_info, strict=True):
        assert (a.block, a.stage, a.window) == (b.block, b.stage, b.window)
        assert tuple(a.grid_shape) == b.grid_shape
        assert (a.tokens_before, a.tokens_after) == (b.tokens_before, b.tokens_after)
        np.testing.assert_array_equal(a.merge_map, b.merge_map)
        assert a.merge_map.dtype == b.merge_map.dtype
        np.testing.assert_array_equal(a.protected, b.protected)
    np.testing.assert_array_equal(
        second.map_to_image(second.merge_info[0].merge_map),
        first.map_to_image(first.merge_info[0].merge_map),
    )
    assert len(cache.entries()) == 1


def test_encode_returns_an_embedding_the_cache_gives_back(merged, image, tmp_path):
    """One container: ``encode`` returns an Embedding, the cache stores and returns one, and
    ``predict(embedding=...)`` answers from it without touching the predictor's own."""
    cache = EmbeddingCache(tmp_path)
    predictor = structsam.Predictor(merged, cache=cache)
    made = predictor.encode(image, prompts={"box": BOX})
    assert isinstance(made, Embedding) and not made.from_cache and not predictor.is_image_set
    with pytest.raises(AttributeError):
        made.seconds = 0.0  # frozen
    served = cache.get(made.key)
    assert isinstance(served, Embedding) and served.from_cache
    assert served.settings == made.settings and served.geometry == made.geometry
    assert served.protection == made.protection and served.prompts is None
    again = predictor.encode(image, prompts={"box": BOX})  # a hit keeps the call's prompts
    assert again.from_cache and again.prompts["box"].tolist() == BOX.tolist()
    masks, _, _ = predictor.predict(box=BOX, embedding=served)
    ref, _, _ = predictor.predict(box=BOX, embedding=made)
    np.testing.assert_array_equal(masks, ref)
    inside = BOX + np.array([2.0, 2.0, -2.0, -2.0])
    assert again.covers({"box": inside}) and not again.covers({"box": [0, 0, 20, 20]})
    other = structsam.Predictor(merged)
    other.set_embedding(served)
    np.testing.assert_array_equal(other.predict(box=BOX)[0], ref)
    bad = Embedding(made.features, made.geometry, "vit_b", made.settings)
    with pytest.raises(StructSAMError, match="made by 'vit_b'"):
        predictor.predict(box=BOX, embedding=bad)


def test_changed_settings_miss_the_cache(merged, image, tmp_path):
    cache = EmbeddingCache(tmp_path)
    predictor = structsam.Predictor(merged, cache=cache)
    with count_encodes(merged) as calls:
        predictor.set_image(image)
        predictor.set_image(image, window=(0.1, 0.8))  # changed window
        predictor.set_image(image, prompts={"box": BOX})  # prompt-aware encode
        predictor.set_image(image, prompts={"box": BOX})  # same prompts again: a hit
        assert predictor.from_cache
        structsam.unpatch(merged)  # the unmerged model (other patches: test_every_setting...)
        predictor.set_image(image)
        predictor.set_image(image, prompts={"box": BOX})  # prompts unused unmerged: a hit
        assert predictor.from_cache
    assert len(calls) == 4 and len(cache.entries()) == 4


def test_every_setting_is_in_the_key(merged, image):
    base = embedding_key(merged, image)
    keys = {base}

    def add(key):
        assert key not in keys
        keys.add(key)

    changed = image.copy()
    changed[0, 0] += 1e-6
    add(embedding_key(merged, changed))
    add(embedding_key(merged, image.astype(np.float64)))  # same values, other dtype
    add(embedding_key(merged, image.T))  # same bytes count, other shape
    add(embedding_key(merged, image, window=(0.0, 0.5)))
    add(embedding_key(merged, image, window=(0.0, 0.5000001)))
    add(embedding_key(merged, image, prompts={"box": BOX}))
    add(embedding_key(merged, image, prompts={"box": BOX + 1}))
    add(embedding_key(merged, image, prompts={}))  # the patch's prompts replaced by none
    for kwargs in (
        {"method": "structsam", "rate": 0.31},
        {"method": "structsam", "rate": 0.3, "seed": 1},
        {"method": "structsam", "rate": 0.3, "prompt_margin": 3.0},
        {"method": "structsam", "rate": 0.3, "blocks": [0, 1, 2]},
        {"method": "structsam", "rate": 0.3, "merge_mlp": False},  # engine options too
        {"method": "structsam", "rate": 0.3, "recovery": "block"},
        {"method": "structsam", "rate": 0.3, "coarse": 0},  # the method's own options
        {"method": "tome", "rate": 0.3},
        {"method": "none"},
    ):
        structsam.patch(merged, **kwargs)
        add(embedding_key(merged, image))
    structsam.patch(merged, "structsam", 0.3)
    assert embedding_key(merged, image) == base  # the same settings again: the same key
    merged.bn_folded = False
    try:
        add(embedding_key(merged, image))
    finally:
        merged.bn_folded = True
    assert embedding_key(merged, image) == base


def test_weights_identity_sees_other_and_modified_weights():
    a = structsam.load_model("litemedsam", checkpoint="random")
    b = structsam.load_model("litemedsam", checkpoint="random")
    assert weights_identity(a) == weights_identity(b)  # seeded: identical weights
    assert weights_identity(a).startswith("state:")
    with torch.no_grad():
        b.mask_decoder.iou_prediction_head.layers[0].weight[0, 0] += 1.0
    assert weights_identity(b) != weights_identity(a)


def test_checkpoint_file_identity(litemedsam):
    identity = weights_identity(litemedsam)
    assert identity.startswith("file:") and len(identity) == 5 + 64
    assert weights_identity(litemedsam) == identity


def test_damaged_entry_is_a_miss_with_a_warning(merged, image, tmp_path):
    cache = EmbeddingCache(tmp_path)
    predictor = structsam.Predictor(merged, cache=cache)
    predictor.set_image(image)
    [(path, size, _)] = cache.entries()
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with count_encodes(merged) as calls, pytest.warns(UserWarning, match="could not be read"):
        predictor.set_image(image)
    assert len(calls) == 1 and not predictor.from_cache
    assert cache.entries()[0][1] == size  # re-encoded and stored again
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="deleted"):
        assert cache.get(predictor.cache_key) is None
    assert not path.exists()


def small_entry(n=16):
    g = Geometry((8, 8), (8, 8), 8)
    return Embedding(torch.full((1, 4, n, n), 1.5), g, "litemedsam", "0" * 64, (), 0.25)


def test_lru_eviction_over_the_size_limit(tmp_path):
    cache = EmbeddingCache(tmp_path, max_bytes=10**9)
    keys = [f"{i:064x}" for i in range(4)]
    for i, key in enumerate(keys):
        path = cache.put(key, small_entry())
        os.utime(path, (1000 + i, 1000 + i))
    size = cache.entries()[0][1]
    assert cache.get(keys[0]) is not None  # a hit makes key 0 the most recent
    (tmp_path / "notes.txt").write_text("kept")  # other files in the folder are never touched
    cache.max_bytes = int(2.5 * size)
    assert cache.evict() == 2
    assert keys[0] in cache and keys[3] in cache
    assert keys[1] not in cache and keys[2] not in cache
    assert (tmp_path / "notes.txt").exists()
    entry = cache.get(keys[3])
    assert entry.seconds == 0.25 and torch.equal(entry.features, small_entry().features)
    assert entry.from_cache and entry.key == keys[3] and entry.model == "litemedsam"


def test_interrupted_put_leaves_nothing(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("a" * 64, small_entry())
    assert os.listdir(tmp_path) == []


def test_folder_and_size_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTSAM_CACHE_DIR", str(tmp_path / "emb"))
    monkeypatch.setenv("STRUCTSAM_CACHE_MAX_BYTES", "2G")
    assert default_cache_folder() == tmp_path / "emb"
    cache = EmbeddingCache()
    assert cache.folder == tmp_path / "emb" and cache.folder.is_dir()
    assert cache.max_bytes == 2 * 2**30
    assert parse_size("500M") == 500 * 2**20 and parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234
    with pytest.raises(StructSAMError, match="size"):
        parse_size("lots")
    (tmp_path / "file").write_text("")
    with pytest.raises(StructSAMError, match="cannot create"):
        EmbeddingCache(tmp_path / "file" / "sub")
    with pytest.raises(StructSAMError, match="not a cache key"):
        cache.path("../escape")


def test_far_larger_images_warn_or_are_refused(litemedsam):
    from structsam.predictor import _check_size

    spec = litemedsam.structsam_spec
    with pytest.warns(UserWarning, match=r"shrunk 8x.*crop the region"):
        _check_size(np.broadcast_to(np.float32(0), (2048, 1024)), spec)
    huge = np.broadcast_to(np.float32(0), (20000, 20000))  # no memory behind it
    with pytest.raises(structsam.errors.ImageError, match="too large.*crop"):
        structsam.Predictor(litemedsam).set_image(huge)


def test_a_changed_method_default_misses_the_cache(merged, image, monkeypatch):
    """The key holds the method's effective options, defaults included: embeddings cached
    before a default changed in the code (StructSAM's prompt focus went from 3 to 6, then
    changed meaning) must not be served for the new one."""
    from structsam.merge import structsam as structsam_method

    defaults = structsam_method.structsam_merge.__kwdefaults__
    base = embedding_key(merged, image, prompts={"box": BOX})
    focus = defaults["prompt_focus"]
    structsam.patch(merged, "structsam", 0.3, prompt_focus=focus)  # the default, spelled out
    assert embedding_key(merged, image, prompts={"box": BOX}) == base

    monkeypatch.setattr(
        structsam_method.structsam_merge, "__kwdefaults__", {**defaults, "prompt_focus": 2 * focus}
    )
    structsam.patch(merged, "structsam", 0.3)
    assert embedding_key(merged, image, prompts={"box": BOX}) != base
