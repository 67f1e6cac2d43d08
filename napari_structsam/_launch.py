"""``structsam annotate [FILE]``: napari with the StructSAM widget docked and an image loaded."""

from __future__ import annotations

from pathlib import Path

NIFTI_OR_DICOM = (".nii", ".nii.gz", ".dcm")


def _read(path: Path):
    """-> (data, layer kwargs) for NIfTI/DICOM through structsam.io (with voxel spacing), or
    None to let napari's own readers open the file."""
    name = path.name.lower()
    if not (path.is_dir() or name.endswith(NIFTI_OR_DICOM)):
        return None
    from structsam import io

    if hasattr(io, "read_volume"):
        volume, spacing, _ = io.read_volume(path)
        return volume, {"name": path.name, "scale": spacing}
    image, _ = io.read_image(path)
    return image, {"name": path.name}


def annotate(path: str | None = None, viewer=None, block: bool = True):
    """Open napari with the widget and ``path`` (default: the MNI152 T1 sample volume)."""
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
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        read = _read(file)
        if read is None:
            viewer.open(str(file))
        else:
            data, meta = read
            viewer.add_image(data, colormap="gray", **meta)
    if viewer.dims.ndim == 3:  # start in the middle of the volume
        viewer.dims.set_current_step(0, viewer.dims.nsteps[0] // 2)
    widget = StructSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="StructSAM", area="right")
    if block:
        napari.run()
    return viewer, widget
