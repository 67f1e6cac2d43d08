"""Token-grid geometry shared by all merge methods: windows, 2x2 cells, prompt regions.

Every index here is computed arithmetically from (row, col), so no method needs a Python loop
over tokens, cells or windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Grid:
    """A (height, width) token grid, optionally cut into square attention windows.

    Windows follow SAM/TinyViT: padding goes to the bottom/right, windows are ``window`` tokens
    on a side. Cells are ``cell`` x ``cell`` tiles *inside* a window (cut short at a window's
    edge), so a merged group never spans two windows and windowed attention stays valid.
    """

    height: int
    width: int
    window: int | None = None  # None: one global window
    cell: int = 2
    device: torch.device | str = "cpu"

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def win(self) -> int:
        return self.window or max(self.height, self.width)

    @property
    def windows_y(self) -> int:
        return -(-self.height // self.win)

    @property
    def windows_x(self) -> int:
        return -(-self.width // self.win)

    @property
    def n_windows(self) -> int:
        return self.windows_y * self.windows_x

    @cached_property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.device) // self.width

    @cached_property
    def cols(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.device) % self.width

    @cached_property
    def window_id(self) -> torch.Tensor:
        """(N,) window index of each token, raster order over windows."""
        return (self.rows // self.win) * self.windows_x + self.cols // self.win

    @cached_property
    def local_pos(self) -> torch.Tensor:
        """(N,) position of each token inside its window, raster order (row * win + col)."""
        return (self.rows % self.win) * self.win + self.cols % self.win

    @property
    def cells_per_window(self) -> int:
        return -(-self.win // self.cell)

    @property
    def cells_y(self) -> int:
        return self.windows_y * self.cells_per_window

    @property
    def cells_x(self) -> int:
        return self.windows_x * self.cells_per_window

    def cell_rc(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,), (N,) row and column of each token's cell on the global cell grid."""
        cpw = self.cells_per_window
        cy = (self.rows // self.win) * cpw + (self.rows % self.win) // self.cell
        cx = (self.cols // self.win) * cpw + (self.cols % self.win) // self.cell
        return cy, cx

    @cached_property
    def cell_id(self) -> torch.Tensor:
        """(N,) cell index of each token; cells never cross a window edge."""
        cy, cx = self.cell_rc()
        return cy * self.cells_x + cx

    @cached_property
    def neighbour_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(4, N) cell ids and (4, N) bool: the cells a token's 3x3 neighbourhood touches, in
        order its own cell, the one above or below, beside, and diagonal, on the side of the
        cell the token sits on (2x2 cells: exactly these four); False where that cell is off
        the grid or in another window."""
        rows, cols = self.rows, self.cols
        # up/left for a token on the first row/column of its cell, else down/right
        dy = torch.where((rows % self.win) % self.cell == 0, -1, 1)
        dx = torch.where((cols % self.win) % self.cell == 0, -1, 1)
        cells, valid = [], []
        for sy, sx in ((0, 0), (1, 0), (0, 1), (1, 1)):
            r, c = rows + sy * dy, cols + sx * dx
            inside = (r >= 0) & (r < self.height) & (c >= 0) & (c < self.width)
            j = torch.where(inside, r * self.width + c, 0)
            cells.append(self.cell_id[j])
            valid.append(inside & (self.window_id[j] == self.window_id))
        return torch.stack(cells), torch.stack(valid)

    @property
    def n_cells(self) -> int:
        return self.cells_y * self.cells_x

    @cached_property
    def cell_count(self) -> torch.Tensor:
        """(n_cells,) number of real tokens in each cell (0 for cells wholly in padding)."""
        return torch.bincount(self.cell_id, minlength=self.n_cells)

    @cached_property
    def cell_window(self) -> torch.Tensor:
        """(n_cells,) window index of each cell."""
        cpw = self.cells_per_window
        cy = torch.arange(self.n_cells, device=self.device) // self.cells_x
        cx = torch.arange(self.n_cells, device=self.device) % self.cells_x
        return (cy // cpw) * self.windows_x + cx // cpw

    @cached_property
    def pad_local_pos(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding tokens of the window layout: (window index, local position), each (P,)."""
        hp, wp = self.windows_y * self.win, self.windows_x * self.win
        r = torch.arange(hp * wp, device=self.device) // wp
        c = torch.arange(hp * wp, device=self.device) % wp
        pad = (r >= self.height) | (c >= self.width)
        r, c = r[pad], c[pad]
        wid = (r // self.win) * self.windows_x + c // self.win
        return wid, (r % self.win) * self.win + c % self.win

    def with_cell(self, cell: int) -> Grid:
        """This grid with ``cell`` x ``cell`` cells, kept with it (a fresh Grid rebuilds its
        index tensors, and the engine keeps its grids across forwards)."""
        cache = self.__dict__.setdefault("_with_cell", {})  # frozen: no setattr
        if cell not in cache:
            cache[cell] = Grid(self.height, self.width, self.window, cell, self.device)
        return cache[cell]

    @cached_property
    def pad_patterns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Which window positions are padding: (n_windows,) pattern index of each window (-1:
        no padding) and (T, win * win) bool, the padded positions of each pattern (T <= 3:
        bottom, right, corner)."""
        wid, pos = self.pad_local_pos
        mask = torch.zeros(self.n_windows, self.win**2, dtype=torch.bool, device=self.device)
        mask[wid, pos] = True
        padded = mask.any(1)
        masks, inverse = torch.unique(mask[padded], dim=0, return_inverse=True)
        pattern = torch.full((self.n_windows,), -1, dtype=torch.long, device=self.device)
        pattern[padded] = inverse
        return pattern, masks


def prompt_mask(
    grid: Grid,
    input_size: int,
    prompts: dict | None,
    margin: float = 2.0,
    point_radius: float = 3.0,
) -> torch.Tensor | None:
    """(H, W) bool mask of tokens to protect around prompts.

    ``prompts`` are in model-input pixels (the square encoder input of side ``input_size``):
    ``box`` (..., 4) and/or ``point_coords`` (..., 2). A box is dilated by ``margin`` tokens,
    a point becomes a disc of ``point_radius`` tokens.
    """
    if not prompts:
        return None
    scale_y = grid.height / input_size
    scale_x = grid.width / input_size
    # token centres in token units
    ty = grid.rows.float() + 0.5
    tx = grid.cols.float() + 0.5
    mask = torch.zeros(grid.n, dtype=torch.bool, device=grid.device)
    box = prompts.get("box")
    if box is not None:
        b = torch.as_tensor(box, dtype=torch.float32, device=grid.device).reshape(-1, 4)
        x0 = b[:, 0:1] * scale_x - margin
        y0 = b[:, 1:2] * scale_y - margin
        x1 = b[:, 2:3] * scale_x + margin
        y1 = b[:, 3:4] * scale_y + margin
        inside = (tx >= x0) & (tx <= x1) & (ty >= y0) & (ty <= y1)
        mask |= inside.any(0)
    pts = prompts.get("point_coords")
    if pts is not None:
        p = torch.as_tensor(pts, dtype=torch.float32, device=grid.device).reshape(-1, 2)
        dx = tx[None] - p[:, 0:1] * scale_x
        dy = ty[None] - p[:, 1:2] * scale_y
        mask |= ((dx * dx + dy * dy) <= point_radius**2).any(0)
    return mask.view(grid.height, grid.width)
