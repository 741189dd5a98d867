"""Image grids a reader can look at: images enlarged to a readable size, each with its prompt under it,
and the comparison grid of an evaluation (rows: prompts, columns: strategies, the full model first).

Small models make small images (the embedded model's are 32×32); shown at their own size
sixteen of them are a 128-pixel smudge. Here each image is enlarged by a whole factor
(nearest neighbour, so no detail is invented) to about :data:`CELL` pixels, and text is
wrapped into the space beside or under it.
"""

from __future__ import annotations

import math
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

from catlab.loggers.base import to_pil

#: the side of one image in a grid, in pixels (reached by a whole enlargement factor)
CELL = 192
FONT_SIZE, PAD = 13, 6


def _font(size: int = FONT_SIZE):
    return ImageFont.load_default(size=size)


def _enlarged(image: torch.Tensor, cell: int) -> Image.Image:
    pil = to_pil(image.float().cpu())
    factor = max(1, round(cell / max(pil.size)))
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)


def _wrap(text: str, width_px: int, lines: int, size: int = FONT_SIZE) -> list[str]:
    """``text`` wrapped to ``width_px`` pixels, at most ``lines`` lines (the last one ending in … if cut)."""
    chars = max(4, int(width_px / (0.55 * size)))
    wrapped = textwrap.wrap(text, chars) or [""]
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], wrapped[lines - 1][: chars - 1] + "…"]
    return wrapped


def captioned_grid(
    images: torch.Tensor, captions: list[str], cols: int | None = None, cell: int = CELL, lines: int = 5
) -> Image.Image:
    """``(B, 3, H, W)`` in [0, 1] → one grid, each image enlarged to about ``cell`` px with its caption under it."""
    tiles = [_enlarged(img, cell) for img in images]
    w, h = tiles[0].size
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    text_h = lines * (FONT_SIZE + 3) + PAD
    grid = Image.new("RGB", (cols * (w + PAD) + PAD, rows * (h + text_h + PAD) + PAD), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x, y = PAD + c * (w + PAD), PAD + r * (h + text_h + PAD)
        grid.paste(tile, (x, y))
        caption = captions[i] if i < len(captions) else ""
        for j, line in enumerate(_wrap(caption, w, lines)):
            draw.text((x, y + h + 3 + j * (FONT_SIZE + 3)), line, fill="black", font=font)
    return grid


def comparison_grid(columns: dict[str, torch.Tensor], prompts: list[str], cell: int = CELL) -> Image.Image:
    """Rows: ``prompts``; columns: strategies (``columns``: label → that strategy's images of those prompts,
    in order; the first column is the full model). Labels head the columns, prompts the rows."""
    labels = list(columns)
    rows = min(len(prompts), *(len(v) for v in columns.values()))
    tiles = {k: [_enlarged(img, cell) for img in v[:rows]] for k, v in columns.items()}
    w, h = tiles[labels[0]][0].size
    side, head_lines = max(2 * w // 3, 150), 4
    head = head_lines * (FONT_SIZE + 3) + PAD
    grid = Image.new("RGB", (side + len(labels) * (w + PAD) + PAD, head + rows * (h + PAD) + PAD), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    for c, label in enumerate(labels):
        x = side + PAD + c * (w + PAD)
        for j, line in enumerate(_wrap(label, w, head_lines)):
            draw.text((x, PAD + j * (FONT_SIZE + 3)), line, fill="black", font=font)
        for r, tile in enumerate(tiles[label]):
            grid.paste(tile, (x, head + r * (h + PAD)))
    for r in range(rows):
        text = _wrap(prompts[r], side - 2 * PAD, max(1, h // (FONT_SIZE + 3)))
        for j, line in enumerate(text):
            draw.text((PAD, head + r * (h + PAD) + j * (FONT_SIZE + 3)), line, fill="black", font=font)
    return grid
