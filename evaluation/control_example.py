"""Write the ControlNet picture of README.md and weights/README.md: one row per control map; columns:
the map; a caption that names no position, alone (no map) and with the map; a caption naming another
position than the map's, alone and with the map (the map should win). Also writes the map of the first row for `make demo`.

    python -m latentloom.evaluation.control_example --output weights/control_example.png \
        --demo-map docs/control-map.png
"""
from __future__ import annotations

import argparse

# (shape, size, position of the map's silhouette, a caption without a position, one naming another position)
ROWS = (
    ("star", "large", "right", "a large orange star on a blue background",
     "a large orange star on the left of a blue background"),
    ("circle", "large", "top", "a large red circle on a white background",
     "a large red circle at the bottom of a white background"),
    ("triangle", "large", "right", "a large green triangle on a black background",
     "a large green triangle on the left of a black background"),
    ("square", "small", "bottom", "a small yellow square on a purple background",
     "a small yellow square at the top of a purple background"),
)


def silhouette_map(shape: str, size: str, position: str):
    """A control map of the bundled ControlNet's kind: one white silhouette on black."""
    from latentloom.synthetic.shapes import SceneSpec, ShapeSpec, render_control_map

    return render_control_map(SceneSpec(shapes=(ShapeSpec(shape, "white", size, position),)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="PNG path")
    parser.add_argument("--demo-map", default=None, help="also save the first row's map here (PNG)")
    parser.add_argument("--seed", type=int, default=0, help="image seed (default 0)")
    parser.add_argument("--zoom", type=int, default=2, help="nearest-neighbour zoom (default 2)")
    args = parser.parse_args(argv)
    if args.zoom < 1:
        raise ValueError(f"--zoom must be >= 1, got {args.zoom}")

    from PIL import Image

    from latentloom.pipelines.loading import load_pipeline
    from latentloom.weights import BUNDLED_CONTROLNET

    pipe = load_pipeline(controlnet=BUNDLED_CONTROLNET)
    maps = [silhouette_map(shape, size, position) for shape, size, position, _, _ in ROWS]
    own, other = [r[3] for r in ROWS], [r[4] for r in ROWS]

    def run(prompts, scale):
        return pipe(prompts, control_image=maps, controlnet_conditioning_scale=scale, seed=args.seed,
                    progress=False).images

    columns = [maps, run(own, 0.0), run(own, 1.0), run(other, 0.0), run(other, 1.0)]
    side = maps[0].width * args.zoom
    grid = Image.new("RGB", (side * len(columns), side * len(ROWS)))
    for c, images in enumerate(columns):
        for r, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (c * side, r * side))
    grid.save(args.output)
    if args.demo_map:
        maps[0].save(args.demo_map)
    print(f"wrote {args.output}: columns = map, no position, no position + map, other position, "
          f"other position + map; "
          f"rows = {own}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
