"""Geometry on every path: an oblique, anisotropic, flipped scan opened in napari (plugin reader
and ``structsam annotate``'s opener), labels drawn in napari's *New labels* layer and in the
plugin's ``structsam objects`` layer, saved by the plugin's writer, reloaded with nibabel."""

import os
import warnings

import nibabel as nib
import numpy as np
import pytest
from test_io import COL_MM, ROW_MM, SLICE_MM, write_dicom_series

from napari_structsam import _io as pio
from napari_structsam import _layers as L
from napari_structsam._io import write_labels as plugin_writer
from napari_structsam._launch import open_file
from structsam import io as sio
from structsam.errors import ImageError

MARKER = 1000.0
NATIVE_MARKER = (3, 11, 5)  # (i, j, k) in the file's own voxel order


def _rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_affine():
    """LAS voxel axes (x flipped), rotated 10 degrees about S and 5 about R, 0.8 x 0.8 x 3 mm
    voxels, origin away from zero."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(2, 10) @ _rotation(0, 5) @ np.diag([-0.8, 0.8, 3.0])
    affine[:3, 3] = [37.5, -12.25, 61.0]
    return affine


@pytest.fixture
def oblique_scan(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 100, (20, 18, 8)).astype(np.float32)
    data[NATIVE_MARKER] = MARKER
    img = nib.Nifti1Image(data, oblique_affine())
    img.set_qform(oblique_affine(), code=1)  # scanner
    img.set_sform(oblique_affine(), code=4)  # MNI: the codes must survive the save
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "scan.nii.gz"
    nib.save(img, path)
    return path


def scanner_point(affine, ijk):
    return (np.asarray(affine) @ [*ijk, 1.0])[:3]


def marker_index(image):
    [index] = np.argwhere(np.asarray(image.data) == MARKER)
    return tuple(int(v) for v in index)


def open_with(how, viewer, path):
    if how == "reader":
        return viewer.open(str(path), plugin="napari-structsam")
    return open_file(viewer, path)  # what `structsam annotate FILE` does


def new_labels_layer(viewer, image):
    """A labels layer made the way napari's *New labels* button makes it."""
    viewer.layers.selection.active = image
    viewer._new_labels()
    return viewer.layers[-1]


def paint_at_world(layer, world_sra, value):
    """Set the voxel of ``layer`` under a world point, as a click there would."""
    index = tuple(int(v) for v in np.round(layer.world_to_data(world_sra)))
    data = np.asarray(layer.data).copy()
    data[index] = value
    layer.data = data


def save_with_plugin(viewer, layer, out):
    viewer.layers.selection = {layer}
    viewer.layers.save(str(out), selected=True, plugin="napari-structsam")
    return nib.load(out)


def labelled_point(img, value):
    [ijk] = np.argwhere(np.asanyarray(img.dataobj) == value)
    return scanner_point(img.affine, ijk)


@pytest.mark.parametrize("how", ["reader", "annotate"])
def test_world_coordinates_are_scanner_coordinates(make_napari_viewer, oblique_scan, how):
    viewer = make_napari_viewer()
    [image] = open_with(how, viewer, oblique_scan)
    ras = scanner_point(nib.load(oblique_scan).affine, NATIVE_MARKER)
    # the documented convention: napari world (w0, w1, w2) = (S, A, R) mm
    np.testing.assert_allclose(image.data_to_world(marker_index(image)), ras[::-1], atol=1e-6)
    assert sorted(image.scale) == pytest.approx([0.8, 0.8, 3.0])
    assert image.metadata["structsam_source"] == os.path.abspath(oblique_scan)


@pytest.mark.parametrize("how", ["reader", "annotate"])
def test_new_labels_and_objects_layer_save_in_the_scan_geometry(
    make_napari_viewer, oblique_scan, tmp_path, how
):
    source = nib.load(oblique_scan)
    ras = scanner_point(source.affine, NATIVE_MARKER)
    viewer = make_napari_viewer()
    [image] = open_with(how, viewer, oblique_scan)

    # napari's New labels copies the placement but not the metadata: the writer finds the image
    drawn = new_labels_layer(viewer, image)
    assert not any(k.startswith("structsam_") for k in drawn.metadata)
    paint_at_world(drawn, ras[::-1], 5)
    saved = save_with_plugin(viewer, drawn, tmp_path / "new.nii.gz")
    # the layer made like the widget's (data indexed like the image)
    objects = L.ensure_layers(viewer, image, image.data.shape)[L.OBJECTS]
    data = np.zeros(image.data.shape, np.int32)
    data[marker_index(image)] = 7
    objects.data = data
    [out] = plugin_writer(str(tmp_path / "objects.nii.gz"), *objects.as_layer_data_tuple()[:2])

    for img, value in ((saved, 5), (nib.load(out), 7)):
        np.testing.assert_array_equal(img.affine, source.affine)
        np.testing.assert_array_equal(img.get_qform(), source.get_qform())
        np.testing.assert_array_equal(img.get_sform(), source.get_sform())
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 4
        assert img.header.get_xyzt_units() == ("mm", "sec")
        assert img.shape == source.shape
        np.testing.assert_allclose(labelled_point(img, value), ras, atol=1e-6)


def test_the_widget_layers_click_on_the_slice_shown(make_napari_viewer, oblique_scan):
    viewer = make_napari_viewer()
    [image] = open_with("reader", viewer, oblique_scan)
    layers = L.ensure_layers(viewer, image, image.data.shape)
    viewer.dims.set_current_step(0, viewer.dims.nsteps[0] // 2)
    shown = int(np.round(image._data_slice.point[0]))  # the slice napari draws
    assert round(float(L.displayed_position(image, viewer.dims.point)[0])) == shown
    # a click anywhere on the canvas lands in that slice of the points layer
    for yx in ([-40.0, -40.0], [40.0, 40.0]):
        world = [viewer.dims.point[0], *yx]
        assert round(float(layers[L.POINTS].world_to_data(world)[0])) == shown
    # and the plugin's layers carry the source geometry for File > Save
    assert layers[L.OBJECTS].metadata["structsam_shape"] == image.data.shape


def test_dicom_series_keeps_its_geometry(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 500, (5, 9, 7)).astype(np.int16)  # (slice, row, column)
    stored[2, 6, 4] = 3000
    row, col = _rotation(2, 10) @ [1.0, 0, 0], _rotation(2, 10) @ _rotation(0, 5) @ [0, 1.0, 0]
    origin = np.array([-30.0, 12.5, 48.0])
    folder = write_dicom_series(tmp_path / "ct", stored, orientation=(*row, *col), origin=origin)
    normal = np.cross(row, col)
    lps = origin + 2 * SLICE_MM * normal + 6 * ROW_MM * col + 4 * COL_MM * row
    ras = lps * [-1, -1, 1]
    hu = 3000.0 - 1024.0

    for how in ("reader", "annotate"):
        viewer = make_napari_viewer()
        [image] = open_with(how, viewer, folder)
        [index] = np.argwhere(np.asarray(image.data) == hu)
        np.testing.assert_allclose(image.data_to_world(index), ras[::-1], atol=1e-4)
        drawn = new_labels_layer(viewer, image)
        paint_at_world(drawn, ras[::-1], 2)
        saved = save_with_plugin(viewer, drawn, tmp_path / f"{how}.nii.gz")
        np.testing.assert_allclose(saved.affine, image.metadata["structsam_affine"])
        assert int(saved.header["qform_code"]) == 1 and int(saved.header["sform_code"]) == 1
        assert saved.header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(labelled_point(saved, 2), ras, atol=1e-4)


def test_saving_onto_the_source_scan_is_refused(make_napari_viewer, oblique_scan, tmp_path):
    before = oblique_scan.read_bytes()
    viewer = make_napari_viewer()
    [image] = open_with("reader", viewer, oblique_scan)
    objects = L.ensure_layers(viewer, image, image.data.shape)[L.OBJECTS]
    link = tmp_path / "link.nii.gz"
    link.symlink_to(oblique_scan)
    for target in (oblique_scan, link, tmp_path / "." / "scan.nii.gz"):
        with pytest.raises(ImageError, match="is the source scan"):
            plugin_writer(str(target), *objects.as_layer_data_tuple()[:2])
    assert oblique_scan.read_bytes() == before


def test_wrong_shape_is_refused_by_the_writer(make_napari_viewer, oblique_scan, tmp_path):
    viewer = make_napari_viewer()
    [image] = open_with("reader", viewer, oblique_scan)
    wrong = viewer.add_labels(np.zeros((3, 4, 5), np.int32), metadata=dict(image.metadata))
    with pytest.raises(ImageError, match=r"does not match the source volume"):
        plugin_writer(str(tmp_path / "w.nii.gz"), *wrong.as_layer_data_tuple()[:2])
    assert not (tmp_path / "w.nii.gz").exists()


def test_labels_without_geometry_are_refused(make_napari_viewer, oblique_scan, tmp_path):
    viewer = make_napari_viewer()
    [image] = open_with("reader", viewer, oblique_scan)
    # the old fallback: the image's shape and scale but not its placement
    stray = viewer.add_labels(np.zeros(image.data.shape, np.int32), scale=image.scale)
    with pytest.raises(ImageError, match="carries no source geometry"):
        plugin_writer(str(tmp_path / "s.nii.gz"), *stray.as_layer_data_tuple()[:2])
    # an image layer from elsewhere has no geometry to lend either
    plain = viewer.add_image(np.zeros((4, 5, 6), np.float32))
    drawn = new_labels_layer(viewer, plain)
    with pytest.raises(ImageError, match="carries no source geometry"):
        plugin_writer(str(tmp_path / "p.nii.gz"), *drawn.as_layer_data_tuple()[:2])
    assert sorted(p.name for p in tmp_path.glob("*.nii*")) == ["scan.nii.gz"]


def test_a_moved_source_still_saves(make_napari_viewer, oblique_scan, tmp_path):
    source = nib.load(oblique_scan)
    viewer = make_napari_viewer()
    [image] = open_with("reader", viewer, oblique_scan)
    objects = L.ensure_layers(viewer, image, image.data.shape)[L.OBJECTS]
    data = np.zeros(image.data.shape, np.int32)
    data[marker_index(image)] = 4
    objects.data = data
    oblique_scan.rename(tmp_path / "elsewhere.nii.gz")
    [out] = plugin_writer(str(tmp_path / "o.nii.gz"), *objects.as_layer_data_tuple()[:2])
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, source.affine)
    assert int(saved.header["sform_code"]) == 4
    np.testing.assert_allclose(
        labelled_point(saved, 4), scanner_point(source.affine, NATIVE_MARKER), atol=1e-6
    )


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (6, 5, 4, 1, 2)])
def test_4d_and_5d_nifti_open_with_the_first_volume(make_napari_viewer, tmp_path, shape):
    data = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(data, oblique_affine()), path)
    viewer = make_napari_viewer()
    n = int(np.prod(shape[3:]))
    with pytest.warns(UserWarning, match=rf"series\.nii\.gz holds {n} volumes.*volume_index=k"):
        [image] = viewer.open(str(path), plugin="napari-structsam")
    first, _, _ = sio.read_volume(path, volume_index=0)
    np.testing.assert_array_equal(image.data, first)
    assert image.name == f"series (volume 0 of {n})"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an explicit volume needs no notice
        [(second, kwargs, _)] = pio.read_layer_data(path, volume_index=1)
    np.testing.assert_array_equal(second, sio.read_volume(path, volume_index=1)[0])
    # labels drawn on a volume of the series save against the (4D) source header
    objects = L.ensure_layers(viewer, image, image.data.shape)[L.OBJECTS]
    [out] = plugin_writer(str(tmp_path / "l.nii.gz"), *objects.as_layer_data_tuple()[:2])
    assert nib.load(out).shape == shape[:3]
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)


def test_labels_drawn_on_the_mni_sample_save_in_mni_space(tmp_path):
    from nilearn import datasets

    from napari_structsam._sample_data import mni152_volume_sample

    [(vol, meta, _)] = mni152_volume_sample()  # Y flipped for display
    labels = np.zeros(vol.shape, np.uint8)
    labels[60, 30, 90] = 1
    [out] = pio.write_labels_layer(tmp_path / "m.nii.gz", labels, meta)
    template = nib.as_closest_canonical(datasets.load_mni152_template(resolution=1))
    saved = nib.load(out)
    # the labelled voxel is the template voxel the sample showed there
    [ijk] = np.argwhere(np.asanyarray(saved.dataobj))
    shown = (90, vol.shape[1] - 1 - 30, 60)  # (x, y, z) of the unflipped template
    np.testing.assert_allclose(
        scanner_point(saved.affine, ijk), scanner_point(template.affine, shown)
    )
