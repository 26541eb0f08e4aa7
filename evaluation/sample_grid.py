"""Write the sample grid of weights/README.md: one row per prompt, one column per seed.

    python -m latentloom.evaluation.sample_grid --output weights/samples.png
"""
from __future__ import annotations

import argparse

PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square on the right of a black background",
    "a large green triangle at the top of a white background",
    "a small white star in the center of a purple background",
    "a large orange circle at the bottom of a cyan background",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="PNG path")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    parser.add_argument("--clip-guidance", type=float, default=0.0, help="CLIP guidance scale (default: off)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")

    from PIL import Image

    from latentloom.pipelines.loading import load_pipeline

    pipe = load_pipeline(args.model)
    rows = [pipe(p, seed=0, num_images_per_prompt=args.seeds, clip_guidance_scale=args.clip_guidance,
                 progress=False).images for p in PROMPTS]
    size = rows[0][0].width
    grid = Image.new("RGB", (size * args.seeds, size * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * size, r * size))
    grid.save(args.output)
    print(f"wrote {args.output}: rows = {list(PROMPTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
