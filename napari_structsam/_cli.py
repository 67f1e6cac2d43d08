"""The ``structsam`` console script: structsam's commands plus the plugin's ``annotate``.

The plugin sits above structsam, so it is the plugin that adds ``annotate`` to structsam's
command line (:class:`structsam.cli.Command`); structsam never imports the plugin.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    from structsam.cli import main as structsam_main

    return structsam_main(argv, extra_commands=commands())


if __name__ == "__main__":
    sys.exit(main())
