"""A procedural world of captioned scenes: the data the embedded model is trained on.

A scene holds one or two flat objects on a plain or gradient background. Each
object has a shape, a colour, a size and one of nine cells of a 3x3 grid; two
objects never share a cell, which keeps the world learnable by a small model
in minutes. Every scene has a caption generated from its attributes, e.g.
"a small red circle in the top left and a large blue square in the bottom right".
The background is a nuisance variable the caption does not mention.

Everything is deterministic from a seed. Training draws from an endless stream
(`scene_stream`); evaluation uses a fixed held-out set (`heldout_scenes`) drawn
from a different branch of the seed tree, so the two never share a draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
COLOUR_RGB = torch.tensor(
    [
        [0.92, 0.12, 0.10],  # red
        [0.10, 0.78, 0.18],  # green
        [0.12, 0.30, 0.98],  # blue
        [0.98, 0.90, 0.10],  # yellow
        [0.68, 0.18, 0.88],  # purple
        [0.10, 0.88, 0.92],  # cyan
    ]
)
SIZES = ("small", "large")
SIZE_RADIUS = (0.28, 0.42)  # object radius as a fraction of the grid cell
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple("center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLS)
NUM_CELLS = 9
MAX_OBJECTS = 2
JITTER = 0.06  # random offset of an object's centre, as a fraction of the cell

# Branches of the seed tree: the training stream and the held-out set never meet.
_TRAIN_BRANCH = 0
_HELDOUT_BRANCH = 1


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order."""
    words = ["a", "and", "in", "the", *SIZES, *COLOURS, *SHAPES, *ROWS, *COLS]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class SceneObject:
    shape: int  # index into SHAPES
    colour: int  # index into COLOURS
    size: int  # index into SIZES
    cell: int  # 0..8, row-major over the 3x3 grid
    dx: float = 0.0  # centre offset in cells
    dy: float = 0.0

    @property
    def phrase(self) -> str:
        return f"a {SIZES[self.size]} {COLOURS[self.colour]} {SHAPES[self.shape]} in the {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[float, ...]  # rgb0 (3), rgb1 (3), gradient angle (radians)
    gradient: bool

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects)


def sample_scene(rng: np.random.Generator, p_two: float = 0.7) -> Scene:
    """Draw one scene: 1 or 2 objects in distinct cells on a dark background."""
    n = 2 if rng.random() < p_two else 1
    cells = rng.choice(NUM_CELLS, size=n, replace=False)
    objects = tuple(
        SceneObject(
            shape=int(rng.integers(len(SHAPES))),
            colour=int(rng.integers(len(COLOURS))),
            size=int(rng.integers(len(SIZES))),
            cell=int(c),
            dx=float(rng.uniform(-JITTER, JITTER)),
            dy=float(rng.uniform(-JITTER, JITTER)),
        )
        for c in cells
    )
    # Dark, low-saturation backgrounds keep every object colour legible.
    grey = rng.uniform(0.0, 0.35, size=2)
    tint = rng.uniform(-0.06, 0.06, size=(2, 3))
    rgb = np.clip(grey[:, None] + tint, 0.0, 1.0)
    gradient = bool(rng.random() < 0.5)
    angle = float(rng.uniform(0, 2 * np.pi))
    return Scene(objects, (*rgb[0].tolist(), *rgb[1].tolist(), angle), gradient)


def _rng(seed: int, branch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, branch]))


def sample_scenes(n: int, seed: int, branch: int = _TRAIN_BRANCH) -> list[Scene]:
    rng = _rng(seed, branch)
    return [sample_scene(rng) for _ in range(n)]


def scene_stream(seed: int, batch_size: int) -> Iterator[list[Scene]]:
    """Endless, deterministic stream of training batches."""
    rng = _rng(seed, _TRAIN_BRANCH)
    while True:
        yield [sample_scene(rng) for _ in range(batch_size)]


def heldout_scenes(n: int = 200, seed: int = 0) -> tuple[list[Scene], list[str]]:
    """The fixed evaluation set: scenes and their captions (never drawn in training)."""
    scenes = sample_scenes(n, seed, branch=_HELDOUT_BRANCH)
    return scenes, [s.caption for s in scenes]


def _triangle_sdf(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (positive inside) to an upward triangle of 'radius' r at the origin."""
    # Vertices (image coordinates, y down): apex, bottom right, bottom left.
    h = 0.85 * r
    verts = [(0.0 * r, -r), (r, h), (-r, h)]
    d = None
    for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
        ex, ey = bx - ax, by - ay
        cross = (ex * (py - ay) - ey * (px - ax)) / torch.sqrt(ex * ex + ey * ey)
        d = cross if d is None else torch.minimum(d, cross)
    return d


def render(scenes: Sequence[Scene], size: int = 32) -> torch.Tensor:
    """Render scenes to float images in [0, 1], shape (B, 3, size, size); vectorised over the batch."""
    b = len(scenes)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)

    bg = torch.tensor([s.background for s in scenes], dtype=torch.float32)  # (B, 7)
    c0, c1, angle = bg[:, 0:3], bg[:, 3:6], bg[:, 6]
    grad = torch.tensor([s.gradient for s in scenes], dtype=torch.float32)
    u = (xx / size - 0.5) * torch.cos(angle)[:, None, None] + (yy / size - 0.5) * torch.sin(angle)[:, None, None]
    w = ((u / 1.42 + 0.5) * grad[:, None, None]).unsqueeze(1)  # (B, 1, S, S); 0 when plain
    img = c0[:, :, None, None] * (1 - w) + c1[:, :, None, None] * w

    # Object attributes padded to MAX_OBJECTS; absent objects get alpha 0.
    attrs = torch.zeros(b, MAX_OBJECTS, 7)
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            attrs[i, j] = torch.tensor([1.0, o.shape, o.colour, o.size, o.cell, o.dx, o.dy])
    present, shape, colour, sz, cell = (attrs[..., k] for k in range(5))
    cell_px = size / 3
    cx = ((cell % 3) + 0.5 + attrs[..., 5]) * cell_px
    cy = ((cell // 3).floor() + 0.5 + attrs[..., 6]) * cell_px
    radius = torch.tensor(SIZE_RADIUS)[sz.long()] * cell_px  # (B, K)

    px = xx - cx[..., None, None]  # (B, K, S, S)
    py = yy - cy[..., None, None]
    r = radius[..., None, None]
    sdf_circle = r - torch.sqrt(px * px + py * py)
    sdf_square = 0.85 * r - torch.maximum(px.abs(), py.abs())
    sdf_triangle = _triangle_sdf(px, py, 1.1 * r)
    sdf = torch.stack([sdf_circle, sdf_square, sdf_triangle])  # (3, B, K, S, S)
    sdf = torch.gather(sdf, 0, shape.long()[None, :, :, None, None].expand(1, -1, -1, size, size))[0]
    alpha = (sdf + 0.5).clamp(0, 1) * present[..., None, None]  # anti-aliased coverage

    rgb = COLOUR_RGB[colour.long()]  # (B, K, 3)
    for j in range(MAX_OBJECTS):
        a = alpha[:, j : j + 1]
        img = img * (1 - a) + rgb[:, j, :, None, None] * a
    return img.clamp(0, 1)


def cell_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Per-cell labels for the probe: shape (0 = empty, 1 + shape), colour, size (-100 where empty)."""
    b = len(scenes)
    shape = torch.zeros(b, NUM_CELLS, dtype=torch.long)
    colour = torch.full((b, NUM_CELLS), -100, dtype=torch.long)
    size = torch.full((b, NUM_CELLS), -100, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            shape[i, o.cell] = 1 + o.shape
            colour[i, o.cell] = o.colour
            size[i, o.cell] = o.size
    return {"shape": shape, "colour": colour, "size": size}
