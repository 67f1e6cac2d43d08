"""structsam.interactive without Qt: the re-encode rule, one patched model per setting,
cancellation, FLOPs statistics and the stores, on the real LiteMedSAM and the MNI152 slice."""

import numpy as np
import pytest

from structsam.interactive import (
    DecoderBusy,
    EmbeddingStore,
    EncodeCancelled,
    EncoderService,
    EncoderSettings,
    Reencode,
    Stats,
    StatsBook,
    reencode_reason,
)
from structsam.patching import merge_config
from structsam.samples import mni152_slice

BOX = np.array([78.0, 65.0, 118.0, 100.0])  # ventricles and caudate heads, axial sample slice
INSIDE = {"box": BOX + np.array([4.0, 4.0, -4.0, -4.0])}
FAR = {"box": np.array([20.0, 150.0, 50.0, 190.0])}
MERGED = EncoderSettings()
AWARE = EncoderSettings(prompt_aware=True)


@pytest.fixture(scope="module")
def image():
    return mni152_slice("axial")


@pytest.fixture(scope="module")
def service():
    return EncoderService()


def test_reencode_rule(service, image):
    assert reencode_reason(None, AWARE, {"box": BOX}) is Reencode.NOT_ENCODED
    assert Reencode.NOT_ENCODED == "slice not encoded yet"  # the value is the user's text
    assert not Reencode.NOT_ENCODED.prompt_aware and Reencode.OUTSIDE.prompt_aware
    plain = service.encode(image, MERGED)
    assert plain.prompts is None
    # content-only merging: any embedding of the slice answers any prompt
    assert reencode_reason(plain, MERGED, FAR) is None
    # prompt-aware: a plain embedding serves until there is something to protect
    assert reencode_reason(plain, AWARE, None) is None
    assert reencode_reason(plain, AWARE, {"box": BOX}) is Reencode.FIRST_PROMPT
    aware = service.encode(image, AWARE, prompts={"box": BOX})
    # the aware embedding protected the prompt region, and merged otherwise than the plain
    assert aware.prompts is not None and aware.covers({"box": BOX})
    assert not np.array_equal(np.asarray(aware.features), np.asarray(plain.features))
    assert reencode_reason(aware, AWARE, INSIDE) is None
    assert reencode_reason(aware, AWARE, {**INSIDE, "point_coords": [[98.0, 80.0]]}) is None
    assert reencode_reason(aware, AWARE, FAR) is Reencode.OUTSIDE
    assert "outside the protected region" in reencode_reason(aware, AWARE, FAR)


def test_one_patched_model_per_setting(service):
    a = service.model(MERGED)
    config = merge_config(a)
    assert config.method.name == "structsam" and set(config.rates.values()) == {MERGED.rate}
    b = service.model(EncoderSettings(rate=0.5))
    dense = service.model(MERGED.unmerged())
    assert len({id(a), id(b), id(dense)}) == 3
    assert set(merge_config(b).rates.values()) == {0.5}
    assert merge_config(dense).rates == {}  # unmerged: the same lean encoder at rate 0
    # asking again gives the same model, never re-patched
    assert service.model(MERGED) is a and merge_config(a) is config
    # prompt-awareness is per call, not a setting of the model
    assert service.model(AWARE) is a
    # copies share the decoder's weights identity, so their cache keys agree
    from structsam.cache import weights_identity

    assert weights_identity(a) == weights_identity(b)


def test_encode_can_be_cancelled_and_the_model_still_works(service, image):
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3  # a few blocks into the encode

    model = service.model(MERGED)

    def pre_hooks():  # the encoder's own (a bf16 encoder casts its input in one) stay
        return sum(len(m._forward_pre_hooks) for m in model.image_encoder.modules())

    before = pre_hooks()
    with pytest.raises(EncodeCancelled):
        service.encode(image, MERGED, cancelled=cancelled)
    assert pre_hooks() == before
    with pytest.raises(EncodeCancelled):  # cancelled before it starts
        service.encode(image, MERGED, cancelled=lambda: True)
    assert service.encode(image, MERGED).features.shape == (1, 256, 64, 64)


def test_flops_statistics_and_a_busy_decoder(service, image):
    book = StatsBook()
    assert book.needs(MERGED) and book.get(MERGED) is None
    stats = service.flops(image, MERGED, book, time_unmerged=True)
    assert stats.dense_flops > stats.flops > 0 and stats.unmerged_seconds > 0
    assert 0.2 < stats.flops_saved < 0.4  # the default rate cuts about 30 %
    book.store(stats)
    assert not book.needs(MERGED)
    # another rate of the same model reuses the dense count: its stats start from the book
    other = EncoderSettings(rate=0.5)
    assert book.get(other).dense_flops == stats.dense_flops and book.get(other).flops is None
    book.note_encode(MERGED.unmerged(), 1.25)
    assert book.get(other).unmerged_seconds == 1.25
    # a real unmerged encode also replaces the time measured with a setting's FLOPs
    assert book.get(MERGED).unmerged_seconds == 1.25
    embedding = service.encode(image, MERGED)
    mask, score = service.decode(MERGED, embedding, {"box": BOX})
    assert mask.shape == image.shape and mask.sum() > 100 and 0 < score <= 1
    with service.count_lock, pytest.raises(DecoderBusy, match="counting"):
        service.decode(MERGED, embedding, {"box": BOX})


def test_the_unmerged_time_is_a_warm_encode(service, image, monkeypatch):
    # a model's first forward builds its kernels; timing it alone once made the status line
    # show a 3x speed-up for a merged encode slower than unmerged
    import dataclasses

    import structsam

    seconds = iter([0.9, 0.3])
    real = structsam.Predictor.encode

    def encode(self, *args, **kwargs):
        return dataclasses.replace(real(self, *args, **kwargs), seconds=next(seconds))

    monkeypatch.setattr(structsam.Predictor, "encode", encode)
    stats = service.flops(image, MERGED, StatsBook(), time_unmerged=True)
    assert stats.unmerged_seconds == 0.3


def test_embedding_store_keeps_the_latest():
    store = EmbeddingStore(capacity=2)
    store.put(0, MERGED, None, "a")
    store.put(1, MERGED, None, "b")
    assert store.get(0, MERGED, None) == "a"  # 0 is now the most recent
    store.put(2, MERGED, None, "c")
    assert store.get(1, MERGED, None) is None and store.slices(MERGED, None) == {0, 2}
    assert store.get(0, AWARE, None) is None and store.get(0, MERGED, (0.0, 1.0)) is None
    assert Stats(MERGED).flops_saved is None


def test_model_pool_keeps_the_latest_within_its_limits():
    from structsam.interactive import ModelPool

    pool = ModelPool(capacity=2)
    first = pool.get(MERGED)
    pool.get(EncoderSettings(rate=0.5))
    assert pool.get(MERGED) is first  # now the most recent
    pool.get(MERGED.unmerged())  # a third: the least recently used (rate 0.5) goes
    assert pool.get(MERGED) is first
    small = ModelPool(capacity=3, max_bytes=1)  # weights over the limit: only the newest stays
    a = small.get(MERGED)
    small.get(EncoderSettings(rate=0.5))
    assert small.get(MERGED) is not a
