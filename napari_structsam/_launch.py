"""``structsam annotate [FILE]``: napari with the StructSAM widget docked and an image loaded."""

from __future__ import annotations

from pathlib import Path


def open_file(viewer, path) -> list:
    """Open ``path`` in ``viewer`` as File > Open does and return the new layers.

    NIfTI files and DICOM folders go through the plugin's reader contribution, so the image
    has its full scanner placement and the source geometry the labels writer needs; a folder
    the reader does not recognise is still read as a DICOM series (its errors name the folder).
    Anything else goes to napari's own readers."""
    from ._io import get_reader, read_volume_layer

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    reader = get_reader(str(file)) or (read_volume_layer if file.is_dir() else None)
    if reader is None:
        return list(viewer.open(str(file)))
    layers = []
    for data, kwargs, kind in reader(str(file)):
        extra = {"colormap": "gray"} if kind == "image" else {}
        layers.append(getattr(viewer, f"add_{kind}")(data, **{**extra, **kwargs}))
    return layers


def annotate(path: str | None = None, viewer=None, block: bool = True):
    """Open napari with the widget and ``path`` (default: the MNI152 T1 sample volume)."""
    if path is not None and not Path(path).exists():  # before the minutes napari may take
        raise FileNotFoundError(f"{path}: no such file or folder")
    from ._session import preload

    preload()  # before napari creates its OpenGL canvas (see preload)
    import napari

    from ._sample_data import mni152_volume_sample
    from ._widget import StructSAMWidget

    viewer = viewer or napari.Viewer(title="StructSAM")
    if path is None:
        for data, meta, _ in mni152_volume_sample():
            viewer.add_image(data, **meta)
    else:
        open_file(viewer, path)
    if viewer.dims.ndim == 3:  # start in the middle of the volume
        viewer.dims.set_current_step(0, viewer.dims.nsteps[0] // 2)
    widget = StructSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="StructSAM", area="right")
    if block:
        napari.run()
    return viewer, widget
