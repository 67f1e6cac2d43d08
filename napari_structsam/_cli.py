"""The ``structsam`` console script: structsam's commands plus the plugin's ``annotate``.

The plugin sits above structsam, so it is the plugin that adds ``annotate`` to structsam's
command line (:class:`structsam.cli.Command`); structsam never imports the plugin.
"""

from __future__ import annotations

import argparse
import os
import sys


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", nargs="?", default=None, help="image to open (default: the MRI sample)"
    )


def _run(args: argparse.Namespace) -> int:
    from structsam.errors import StructSAMError

    from ._launch import annotate

    try:
        annotate(args.file)
    except FileNotFoundError as exc:
        raise StructSAMError(str(exc)) from exc
    except ImportError as exc:  # napari is an extra: say how to get it
        raise StructSAMError(
            f"structsam annotate needs napari ({exc}); install it with: pip install '.[napari]'"
        ) from exc
    return 0


def commands() -> tuple:
    from structsam.cli import Command

    return (
        Command("annotate", "open napari with the StructSAM widget (and FILE)", _configure, _run),
    )


def release_passive_openmp(argv: list[str]) -> None:
    """Every command but ``annotate`` runs as a plain Python process does: the package set
    ``OMP_WAIT_POLICY=PASSIVE`` (and a short ``GOMP_SPINCOUNT``) for napari's render threads,
    and passive OpenMP threads wake up late for each of the encoder's many small parallel
    regions. Must run before torch loads."""
    import napari_structsam

    if napari_structsam.OMP_PASSIVE_SET_HERE and (not argv or argv[0] != "annotate"):
        os.environ.pop("OMP_WAIT_POLICY", None)
        if napari_structsam.SPIN_SET_HERE:
            os.environ.pop("GOMP_SPINCOUNT", None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    release_passive_openmp(argv)
    from structsam.cli import main as structsam_main

    return structsam_main(argv, extra_commands=commands())


if __name__ == "__main__":
    sys.exit(main())
