"""The embedded default model: a small SD3-architecture text-to-image model trained on a
procedural world of captioned shapes, so catlab runs without network access.

Import the parts directly (kept out of this module so importing it stays cheap):
`catlab.embedded.bundle.load_bundle`, `catlab.embedded.world`, `catlab.embedded.probe`.
"""
