"""Video probe: reads each captioned object's presence, shape, size and motion back from a video.

This is the alignment metric of the embedded video model, in the role the attribute probe
(catlab.embedded.probe) plays for the image model: ``video_accuracy(videos, clips)`` is, per
prompt, the share of the attributes its caption states that the probe finds in the video.

It is a hand-written detector, not a learnt one, so it needs no weights and cannot fit the
model's quirks. Objects of one clip never share a colour (catlab.embedded.video_world), so the
probe looks each stated object up by its colour: a pixel belongs to colour ``k`` when ``k`` is
its nearest palette colour and it lies within ``COLOUR_TOLERANCE`` of it. Per frame it keeps the
mask's largest connected blob (scattered pixels of noise are not an object) and measures its area,
centroid and fill of its bounding box; then

- present: in most frames the blob holds at least ``MIN_PIXELS`` pixels and fills at least
           ``MIN_FILL`` of its bounding box (a compact object of that colour is there);
- shape:   the median bounding-box fill: a square fills it, a circle ~0.79 of it, a triangle ~0.5;
- size:    the median area, against the midpoint of the small and large renders of that shape;
- motion:  the least-squares slope of the centroid track: still below ``STILL_SPEED`` pixels
           per frame, else the direction of its larger component.

Shape, size and motion count only where the object is present. ``probe_hits`` gives the
per-object table, ``attribute_table`` the share of each attribute over a set.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from catlab.embedded.video_world import MOTIONS, Clip, MovingObject, render_clips
from catlab.embedded.world import COLOUR_RGB, SHAPES, SIZES

ATTRIBUTES = ("present", "shape", "size", "motion")
COLOUR_TOLERANCE = 0.3  # RGB distance (in [0, 1] units) within which a pixel counts as a palette colour
MIN_PIXELS = 6  # fewer pixels than this in a frame: the object is not seen there
MIN_FILL = 0.35  # a blob filling less of its bounding box is scattered noise, not an object
STILL_SPEED = 0.4  # centroid speed (pixels per frame) below which an object counts as still
SHAPE_FILL = (0.9, 0.66)  # fill >= 0.9: square; >= 0.66: circle; else triangle


def colour_masks(videos: torch.Tensor) -> torch.Tensor:
    """Videos in [0, 1], (B, F, 3, H, W) -> bool masks (B, colours, F, H, W) of each palette colour."""
    x = videos.float().permute(0, 1, 3, 4, 2)[..., None, :]  # (B, F, H, W, 1, 3)
    dist = (x - COLOUR_RGB).norm(dim=-1)  # (B, F, H, W, colours)
    nearest = dist.argmin(-1)
    masks = torch.stack([(nearest == k) & (dist[..., k] < COLOUR_TOLERANCE) for k in range(len(COLOUR_RGB))])
    return masks.permute(1, 0, 2, 3, 4)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Per frame of a (F, H, W) bool mask, its largest 8-connected component (speckle is dropped).

    Every pixel starts with its own label and takes the largest label of its 3x3 neighbourhood inside
    the mask until nothing changes; then the most frequent label of each frame is kept."""
    f, h, w = mask.shape
    if not mask.any():
        return mask
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, h, w).expand(f, h, w).clone()
    m = mask.float()
    labels = ids * m
    for _ in range(h * w):
        grown = torch.nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * m
        if torch.equal(grown, labels):
            break
        labels = grown
    keep = torch.zeros_like(mask)
    for k in range(f):
        values = labels[k][mask[k]]
        if len(values):
            keep[k] = labels[k] == values.mode().values
    return keep & mask


def _track(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame area, centroid (x, y) and bounding-box fill of a (F, H, W) mask."""
    f, h, w = mask.shape
    m = mask.float()
    area = m.sum((1, 2))
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    safe = area.clamp(min=1)
    cx, cy = (m * xs).sum((1, 2)) / safe, (m * ys).sum((1, 2)) / safe
    rows, cols = mask.any(2), mask.any(1)  # (F, H), (F, W)
    # the bounding box spans from the first to the last occupied row/column
    first_r = rows.float().argmax(1)
    last_r = h - 1 - rows.flip(1).float().argmax(1)
    first_c = cols.float().argmax(1)
    last_c = w - 1 - cols.flip(1).float().argmax(1)
    box = ((last_r - first_r + 1).clamp(min=1) * (last_c - first_c + 1).clamp(min=1)).float()
    return {"area": area, "cx": cx, "cy": cy, "fill": area / box}


@functools.lru_cache(maxsize=1)
def _area_thresholds() -> dict[int, float]:
    """Per shape, the area between its small and large renders (measured with this probe's own mask)."""
    out = {}
    for shape in range(len(SHAPES)):
        areas = []
        for size in range(len(SIZES)):
            obj = MovingObject(shape, 0, size, MOTIONS.index("still"), 0.5, 0.5, 0.0)
            clip = Clip((obj,), (0.0,) * 6 + (0.0,), False)
            video = render_clips([clip], frames=1).permute(0, 2, 1, 3, 4)
            areas.append(float(colour_masks(video)[0, 0, 0].sum()))
        out[shape] = (areas[0] * areas[1]) ** 0.5
    return out


def read_object(mask: torch.Tensor, size_px: int) -> dict[str, int | bool]:
    """What the probe reads from one colour's (F, H, W) mask: present, shape, size and motion indices."""
    t = _track(largest_component(mask))
    seen = (t["area"] >= MIN_PIXELS * (size_px / 32) ** 2) & (t["fill"] >= MIN_FILL)
    present = bool(seen.float().mean() > 0.5)
    if not present:
        return {"present": False, "shape": -1, "size": -1, "motion": -1}
    fill = float(t["fill"][seen].median())
    shape = 0 if SHAPE_FILL[1] <= fill < SHAPE_FILL[0] else (1 if fill >= SHAPE_FILL[0] else 2)  # circle, square, tri
    area = float(t["area"][seen].median()) * (32 / size_px) ** 2
    size = int(area >= _area_thresholds()[shape])
    frames = torch.arange(mask.shape[0], dtype=torch.float32)[seen]
    if len(frames) < 2:
        motion = MOTIONS.index("still")
    else:
        fc = frames - frames.mean()
        vx = float((fc * t["cx"][seen]).sum() / (fc * fc).sum()) * 32 / size_px
        vy = float((fc * t["cy"][seen]).sum() / (fc * fc).sum()) * 32 / size_px
        if max(abs(vx), abs(vy)) < STILL_SPEED:
            motion = MOTIONS.index("still")
        elif abs(vx) >= abs(vy):
            motion = MOTIONS.index("right" if vx > 0 else "left")
        else:
            motion = MOTIONS.index("down" if vy > 0 else "up")
    return {"present": True, "shape": shape, "size": size, "motion": motion}


def frames_layout(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) from that layout or Wan's (B, 3, F, H, W)."""
    if videos.ndim != 5:
        raise ValueError(f"videos are (B, frames, 3, H, W); got shape {tuple(videos.shape)}")
    return videos if videos.shape[2] == 3 else videos.transpose(1, 2)


def probe_hits(videos: torch.Tensor, clips: Sequence[Clip]) -> list[torch.Tensor]:
    """Per clip, a bool tensor (objects, 4): which of present, shape, size, motion the probe finds.

    ``videos`` are in [0, 1], (B, frames, 3, H, W) (or Wan's (B, 3, frames, H, W)).
    """
    videos = frames_layout(videos)
    if len(videos) != len(clips):
        raise ValueError(f"{len(videos)} videos for {len(clips)} clips")
    masks = colour_masks(videos)
    out = []
    for i, clip in enumerate(clips):
        rows = []
        for o in clip.objects:
            r = read_object(masks[i, o.colour], videos.shape[-1])
            p = r["present"]
            rows.append([p, p and r["shape"] == o.shape, p and r["size"] == o.size, p and r["motion"] == o.motion])
        out.append(torch.tensor(rows, dtype=torch.bool))
    return out


def video_accuracy(videos: torch.Tensor, clips: Sequence[Clip]) -> torch.Tensor:
    """Per-prompt share (B,) of the stated attributes (present, shape, size, motion of each object) found."""
    return torch.stack([h.float().mean() for h in probe_hits(videos, clips)])


def attribute_table(videos: torch.Tensor, clips: Sequence[Clip]) -> dict[str, float]:
    """Share of objects whose each attribute the probe finds, and the mean per-prompt accuracy."""
    hits = probe_hits(videos, clips)
    rows = torch.cat(hits).float()
    table = {name: float(rows[:, k].mean()) for k, name in enumerate(ATTRIBUTES)}
    table["accuracy"] = float(torch.stack([h.float().mean() for h in hits]).mean())
    return table


def evaluate_bundle(
    path=None, n: int = 32, steps: int = 20, guidance: float = 4.0, seed: int = 0, real_only: bool = False
) -> dict:
    """The probe on ``n`` held-out clips as rendered (a sanity check of the probe) and as the bundle
    generates them from their captions (the model's alignment), plus what produced the figures."""
    import time

    from catlab.embedded.video import generate_video, load_video_bundle
    from catlab.embedded.video_world import heldout_clips

    if real_only:
        clips, _ = heldout_clips(n, seed=seed)
        return {"prompts": n, "seed": seed, "real": attribute_table(render_clips(clips), clips)}
    bundle = load_video_bundle(path)
    clips, captions = heldout_clips(n, seed=seed, frames=bundle.frames)
    real = render_clips(clips, bundle.frames, bundle.image_size)
    start = time.time()
    fake = (generate_video(bundle, captions, steps=steps, guidance=guidance, seed=seed) + 1) / 2
    return {
        "prompts": n,
        "sampling_steps": steps,
        "guidance": guidance,
        "seed": seed,
        "real": attribute_table(real, clips),
        "generated": attribute_table(fake, clips),
        "generation_seconds": round(time.time() - start, 1),
        "_videos": (fake, real, captions),
    }


def main(argv=None) -> None:
    """``python -m catlab.embedded.video_probe [--bundle DIR] [--prompts N] [--steps S] [--out FILE.json]``:
    the probe's accuracy on held-out captions, for rendered clips and for the model's videos."""
    import argparse
    import json
    import pathlib

    from catlab.loggers.video import save_gif

    ap = argparse.ArgumentParser(description="Video probe accuracy of the embedded video model on held-out captions.")
    ap.add_argument("--bundle", default=None, help="a video bundle folder (default: the shipped one)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real-only", action="store_true", help="only the rendered clips (the probe's own check)")
    ap.add_argument("--out", default=None, help="write the figures here (JSON) and the videos beside it (GIF)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate_bundle(args.bundle, args.prompts, args.steps, args.guidance, real_only=args.real_only)
    fake, real, captions = result.pop("_videos", (None, None, None))
    print(json.dumps(result, indent=2))
    if args.out and fake is None:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    elif args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        both = torch.cat([fake, real], dim=-2)[:8]  # (B, 3, F, 2H, W): generated above rendered
        save_gif(torch.cat(list(both), dim=-1), out.with_suffix(".gif"))
        out.with_suffix(".txt").write_text("\n".join(captions[:8]) + "\n")


if __name__ == "__main__":
    main()
