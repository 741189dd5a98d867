"""Token grids: the shape of a model's image (or video) tokens.

A grid is a tuple of positive ints: ``(height, width)`` for an image model, ``(frames, height, width)`` for a
video model. Tokens are numbered row-major over it, frames outermost -- the order in which a patch embedding
flattens its output (``Conv2d``/``Conv3d`` then ``flatten(2)``). A 2D grid is a video of one frame:
:func:`as_video` turns either form into ``(frames, height, width)`` so that a selector written for space and
time serves images unchanged.
"""

from __future__ import annotations

import math

#: ``(height, width)`` or ``(frames, height, width)``
Grid = tuple[int, ...]


def check_grid(grid) -> Grid:
    """The grid as a tuple of ints, or a ``ValueError`` that names what is wrong."""
    grid = tuple(int(size) for size in grid)
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise ValueError(f"a token grid is (height, width) or (frames, height, width) of positive sizes; got {grid}")
    return grid


def grid_tokens(grid: Grid) -> int:
    """How many tokens the grid holds."""
    return math.prod(grid)


def as_video(grid: Grid) -> tuple[int, int, int]:
    """``(frames, height, width)``: an image grid is one frame."""
    grid = check_grid(grid)
    return grid if len(grid) == 3 else (1, *grid)


def frame_shape(grid: Grid) -> tuple[int, int]:
    """``(height, width)`` of one frame."""
    return as_video(grid)[1:]


def num_frames(grid: Grid) -> int:
    return as_video(grid)[0]
