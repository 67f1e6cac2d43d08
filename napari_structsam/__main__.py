"""``python -m napari_structsam annotate FILE``: the ``structsam`` console script."""

import sys

from ._cli import main

sys.exit(main())
