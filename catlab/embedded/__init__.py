"""The embedded default model: a small SD3-architecture text-to-image model trained on a
procedural world of captioned shapes, so catlab runs without network access.

Import the parts directly (kept out of this module so importing it stays cheap):
`catlab.embedded.bundle.load_bundle`, `catlab.embedded.world`, `catlab.embedded.probe`.

The embedded video model (a small Wan2.1-architecture text-to-video model on a world of moving
shapes, docs/model_card_video.md) is `catlab.embedded.video.load_video_bundle`,
`catlab.embedded.video_world` and `catlab.embedded.video_probe`.
"""
