"""A procedural world of captioned moving shapes: the data the embedded video model is trained on.

A clip is ``FRAMES`` frames of one or two flat objects gliding over a dark plain or gradient
background. Each object has a shape, a colour (two objects never share one, so a reader can tell
them apart by colour), a size and a motion: left, right, up, down or staying still, at a constant
speed. Its caption names exactly those, e.g. "a small red circle moving right and a large blue
square staying still". Where an object starts, its speed and the background are nuisance
variables the caption does not mention; trajectories stay inside the frame and two objects keep
apart, so every stated attribute is visible in every frame.

Everything is deterministic from a seed. Batch ``i`` of the training stream is drawn from its own
branch of the seed tree (``clip_batch(seed, i, n)``), so a resumed run sees exactly the batches
it would have seen; the held-out set (``heldout_clips``) comes from another branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from catlab.embedded.world import COLOUR_RGB, COLOURS, SHAPES, SIZES, _triangle_sdf

MOTIONS = ("left", "right", "up", "down", "still")
MOTION_PHRASES = ("moving left", "moving right", "moving up", "moving down", "staying still")
MOTION_VECTORS = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0), (0.0, 0.0))  # (dx, dy), y down
FRAMES = 8
SIZE = 32  # frame height and width in pixels
RADIUS = (0.13, 0.19)  # object radius per size, as a fraction of the frame side
SPEED = (0.035, 0.05)  # pixels per frame range, as a fraction of the frame side
MAX_OBJECTS = 2

_TRAIN_BRANCH = 10
_HELDOUT_BRANCH = 11


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order."""
    words = ["a", "and", *SIZES, *COLOURS, *SHAPES, "moving", "staying", "left", "right", "up", "down", "still"]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class MovingObject:
    shape: int  # index into SHAPES
    colour: int  # index into COLOURS
    size: int  # index into SIZES
    motion: int  # index into MOTIONS
    x0: float  # centre at frame 0, fraction of the frame side
    y0: float
    speed: float  # fraction of the frame side per frame

    @property
    def phrase(self) -> str:
        return f"a {SIZES[self.size]} {COLOURS[self.colour]} {SHAPES[self.shape]} {MOTION_PHRASES[self.motion]}"

    def centre(self, frame: int) -> tuple[float, float]:
        """(x, y) of the centre at ``frame``, fractions of the frame side."""
        dx, dy = MOTION_VECTORS[self.motion]
        return self.x0 + dx * self.speed * frame, self.y0 + dy * self.speed * frame


@dataclass(frozen=True)
class Clip:
    objects: tuple[MovingObject, ...]
    background: tuple[float, ...]  # rgb0 (3), rgb1 (3), gradient angle (radians)
    gradient: bool

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects)


def _place(rng: np.random.Generator, size: int, motion: int, speed: float, frames: int) -> tuple[float, float]:
    """A start centre whose whole trajectory keeps the object inside the frame."""
    r = RADIUS[size] * 1.1
    dx, dy = MOTION_VECTORS[motion]
    travel = speed * (frames - 1)
    lo_x, hi_x = r + max(0.0, -dx) * travel, 1 - r - max(0.0, dx) * travel
    lo_y, hi_y = r + max(0.0, -dy) * travel, 1 - r - max(0.0, dy) * travel
    return float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))


def _apart(a: MovingObject, b: MovingObject, frames: int) -> bool:
    """True when the two objects' discs never touch in any frame."""
    gap = RADIUS[a.size] * 1.1 + RADIUS[b.size] * 1.1 + 0.02
    for f in range(frames):
        (ax, ay), (bx, by) = a.centre(f), b.centre(f)
        if (ax - bx) ** 2 + (ay - by) ** 2 < gap * gap:
            return False
    return True


def sample_clip(rng: np.random.Generator, frames: int = FRAMES, p_two: float = 0.6) -> Clip:
    """Draw one clip: 1 or 2 objects of distinct colours on a dark background."""
    n = 2 if rng.random() < p_two else 1
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    objects: list[MovingObject] = []
    for colour in colours:
        for _ in range(50):  # rejection: the second object keeps clear of the first
            shape, size, motion = int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZES))), int(rng.integers(5))
            speed = float(rng.uniform(*SPEED))
            x0, y0 = _place(rng, size, motion, speed, frames)
            obj = MovingObject(shape, int(colour), size, motion, x0, y0, speed)
            if all(_apart(obj, o, frames) for o in objects):
                objects.append(obj)
                break
    grey = rng.uniform(0.0, 0.3, size=2)
    tint = rng.uniform(-0.05, 0.05, size=(2, 3))
    rgb = np.clip(grey[:, None] + tint, 0.0, 1.0)
    gradient = bool(rng.random() < 0.5)
    angle = float(rng.uniform(0, 2 * np.pi))
    return Clip(tuple(objects), (*rgb[0].tolist(), *rgb[1].tolist(), angle), gradient)


def _rng(seed: int, *branch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *branch]))


def clip_batch(seed: int, index: int, n: int, frames: int = FRAMES) -> list[Clip]:
    """Training batch number ``index`` (random access: a resumed run draws the same batches)."""
    rng = _rng(seed, _TRAIN_BRANCH, index)
    return [sample_clip(rng, frames) for _ in range(n)]


def heldout_clips(n: int = 64, seed: int = 0, frames: int = FRAMES) -> tuple[list[Clip], list[str]]:
    """The fixed evaluation set: clips and their captions (never drawn in training)."""
    rng = _rng(seed, _HELDOUT_BRANCH)
    clips = [sample_clip(rng, frames) for _ in range(n)]
    return clips, [c.caption for c in clips]


def render_clips(clips: Sequence[Clip], frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """Render clips to float videos in [0, 1], shape (B, 3, frames, size, size) (Wan's layout)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S), fractions of the side

    bg = torch.tensor([c.background for c in clips], dtype=torch.float32)
    c0, c1, angle = bg[:, 0:3], bg[:, 3:6], bg[:, 6]
    grad = torch.tensor([c.gradient for c in clips], dtype=torch.float32)
    u = (xx - 0.5) * torch.cos(angle)[:, None, None] + (yy - 0.5) * torch.sin(angle)[:, None, None]
    w = ((u / 1.42 + 0.5) * grad[:, None, None]).unsqueeze(1)  # (B, 1, S, S)
    background = c0[:, :, None, None] * (1 - w) + c1[:, :, None, None] * w  # (B, 3, S, S)
    video = background[:, :, None].repeat(1, 1, frames, 1, 1)  # (B, 3, F, S, S)

    t = torch.arange(frames, dtype=torch.float32)
    for j in range(MAX_OBJECTS):
        rows = [(i, c.objects[j]) for i, c in enumerate(clips) if len(c.objects) > j]
        if not rows:
            continue
        idx = torch.tensor([i for i, _ in rows])
        o = [obj for _, obj in rows]
        mv = torch.tensor([MOTION_VECTORS[x.motion] for x in o])  # (n, 2)
        speed = torch.tensor([x.speed for x in o])
        cx = torch.tensor([x.x0 for x in o])[:, None] + mv[:, 0:1] * speed[:, None] * t  # (n, F)
        cy = torch.tensor([x.y0 for x in o])[:, None] + mv[:, 1:2] * speed[:, None] * t
        r = (torch.tensor([RADIUS[x.size] for x in o]) * size)[:, None, None, None]
        px = (xx - cx[..., None, None]) * size  # (n, F, S, S), pixels
        py = (yy - cy[..., None, None]) * size
        circle = r - torch.sqrt(px * px + py * py)
        square = 0.85 * r - torch.maximum(px.abs(), py.abs())
        sdf = torch.stack([circle, square, _triangle_sdf(px, py, r * 1.1)])  # (3, n, F, S, S)
        shape = torch.tensor([x.shape for x in o])
        sdf = sdf[shape, torch.arange(len(o))]  # (n, F, S, S)
        alpha = (sdf + 0.5).clamp(0, 1)[:, None]  # (n, 1, F, S, S)
        rgb = COLOUR_RGB[torch.tensor([x.colour for x in o])][:, :, None, None, None]
        video[idx] = video[idx] * (1 - alpha) + rgb * alpha
    return video.clamp(0, 1)
