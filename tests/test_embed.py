"""``structsam embed``: every slice's embedding precomputed, resumable, on Dask for many
volumes; a Predictor with the same cache then needs no encoder."""

import contextlib
import io as stdio

import nibabel as nib
import numpy as np
import pytest
import torch

import structsam
from structsam import embed
from structsam.cache import EmbeddingCache
from structsam.cli import main
from structsam.samples import mni152_volume

MRI_SLICES = (90, 94)
BOX = np.array([60.0, 70.0, 120.0, 130.0])


def hooked_build(calls, limit):
    """build_model whose encoder counts its calls and is 'interrupted' before call limit+1."""
    real = embed.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)

        def before(*_):
            if limit is not None and len(calls) >= limit:
                raise KeyboardInterrupt

        model.image_encoder.register_forward_pre_hook(before)
        model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
        return model

    return build


def run_cli(argv, calls, limit=None):
    out = stdio.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(embed, "build_model", hooked_build(calls, limit))
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def mri_cache(tmp_path_factory):
    """The bundled MRI volume (4 slices of it) embedded by the CLI, stopped after 2 slices
    and restarted."""
    folder = tmp_path_factory.mktemp("mri-cache")
    start, stop = MRI_SLICES
    argv = ["embed", "sample:mri", "--slices", f"{start}:{stop}", "--out", str(folder)]
    # fp32 like the litemedsam fixture: "auto" is bf16 on a CPU with AMX, and the cache keys
    # the precision
    argv += ["--rate", "0.33", "--precision", "fp32", "--no-progress"]
    first, second = [], []
    code1, out1 = run_cli(argv, first, limit=2)
    n_after_stop = len(EmbeddingCache(folder).entries())
    code2, out2 = run_cli(argv, second)
    return {
        "folder": folder,
        "codes": (code1, code2),
        "encodes": (len(first), len(second)),
        "entries": (n_after_stop, len(EmbeddingCache(folder).entries())),
        "out": (out1, out2),
    }


def test_cli_resumes_without_redoing_finished_slices(mri_cache):
    assert mri_cache["codes"] == (130, 0)
    assert "run the same command to resume" in mri_cache["out"][0]
    assert mri_cache["encodes"] == (2, 2)  # 4 slices: 2 before the stop, only 2 after it
    assert mri_cache["entries"] == (2, 4)
    assert "4 slices, 2 encoded" in mri_cache["out"][1]
    assert "2 already cached" in mri_cache["out"][1]
    assert "MiB/slice" in mri_cache["out"][1]


def test_predictor_annotates_the_embedded_volume_without_the_encoder(litemedsam, mri_cache):
    volume, _ = embed.sample_volume("sample:mri")  # what the plugin's sample layer shows
    cache = EmbeddingCache(mri_cache["folder"])
    structsam.patch(litemedsam, "structsam", 0.33)  # what the CLI ran
    calls = []
    handle = litemedsam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        cached = structsam.Predictor(litemedsam, cache=cache)
        fresh = structsam.Predictor(litemedsam)
        for z in range(*MRI_SLICES):
            cached.set_image(volume[z])
            assert cached.from_cache and len(calls) == 0
            assert len(cached.merge_info) == 10
            fresh.set_image(volume[z])  # an uninterrupted encode of the same slice
            assert torch.equal(cached.features, fresh.features)
            np.testing.assert_array_equal(cached.predict(box=BOX)[0], fresh.predict(box=BOX)[0])
            calls.clear()
    finally:
        handle.remove()
        structsam.unpatch(litemedsam)


def small_nifti(path, slices=slice(88, 91)):
    volume, _ = mni152_volume()
    data = volume[slices]
    # anisotropic voxels (2.5 mm slices); a diagonal affine keeps read_volume's layout
    nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), np.diag([1.0, 1.0, 2.5, 1.0])), path)
    return path, data


def test_embed_volume_interrupted_by_the_progress_callback(litemedsam, tmp_path):
    path, data = small_nifti(tmp_path / "vol.nii.gz")
    cache = EmbeddingCache(tmp_path / "cache")
    structsam.patch(litemedsam, "structsam", 0.3)
    calls = []
    handle = litemedsam.image_encoder.register_forward_hook(lambda *_: calls.append(1))

    def stop_after_one(done, total):
        assert total == 3
        if done == 1:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            embed.embed_volume(
                path, cache, litemedsam, window="mr-percentiles", progress=stop_after_one
            )
        assert len(calls) == 1
        result = embed.embed_volume(
            path, cache, litemedsam, window="mr-percentiles", progress=False
        )
        assert len(calls) == 3
        assert (result.n_slices, result.encoded, result.cached) == (3, 2, 1)
        assert result.window == structsam.windows.resolve_window("mr-percentiles", data)
        assert len(result.encode_seconds) == 2 and result.bytes_per_slice > 4 * 2**20
        again = embed.embed_volume(path, cache, litemedsam, window="mr-percentiles", progress=False)
        assert (again.encoded, again.cached) == (0, 3) and len(calls) == 3
    finally:
        handle.remove()
        structsam.unpatch(litemedsam)


def test_embed_volumes_on_a_local_dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    a, _ = small_nifti(tmp_path / "a.nii.gz", slice(80, 81))
    b, _ = small_nifti(tmp_path / "b.nii", slice(100, 101))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b broken")
    cache = EmbeddingCache(tmp_path / "cache")
    threads = torch.get_num_threads()
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        results = embed.embed_volumes([a, b, bad], cache, scheduler=client, rate=0.3)
        assert [r.encoded for r in results[:2]] == [1, 1]
        assert "bad.nii.gz" in results[2].error and "corrupt" in results[2].error
        assert len(cache.entries()) == 2
        again = embed.embed_volumes([a, b], cache, scheduler=client, rate=0.3, progress=False)
        assert [(r.encoded, r.cached) for r in again] == [(0, 1), (0, 1)]
    assert torch.get_num_threads() == threads


def test_bad_requests_are_clear(tmp_path):
    with pytest.raises(structsam.errors.StructSAMError, match="unknown sample"):
        embed.load_volume("sample:ct")
    with pytest.raises(structsam.errors.StructSAMError, match="outside the volume"):
        embed._slice_range("5:9", 6)
    with pytest.raises(structsam.errors.StructSAMError, match="START:STOP"):
        embed._slice_range("a:b", 6)
    code = main(["embed", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "c")])
    assert code == 2


def test_sample_volume_is_what_the_plugin_shows():
    # the cache matches slices byte for byte: embed's sample:mri must be the plugin's layer
    sample_data = pytest.importorskip("napari_structsam._sample_data")
    [(data, meta, _)] = sample_data.mni152_volume_sample()
    volume, spacing = embed.sample_volume("sample:mri")
    np.testing.assert_array_equal(volume, data)
    assert volume.dtype == data.dtype and tuple(meta["scale"]) == spacing
