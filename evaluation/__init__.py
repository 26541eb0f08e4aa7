"""Evaluation of prompt following on the bundled synthetic shapes domain.

`shape_checker` reads a 64x64 image back into (color, shape, size, position);
`prompt_following.evaluate` turns that into per-attribute accuracy for a generator.
Neither imports torch: they work on PIL images and numpy arrays.
"""
