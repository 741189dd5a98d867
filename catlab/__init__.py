"""catlab."""
