"""Pipelines: text-to-image, img2img, inpaint, upscale, cascade; loading and metadata."""
