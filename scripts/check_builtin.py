"""Judge the built-in model with its classifier before judging the method on it.

    python scripts/check_builtin.py --per-pair 2 --per-object 12 --grid runs/check_grid.png
    python scripts/check_builtin.py --model builtin-flux

Styled prompts ("a star in neon style", every object x style pair): object and style accuracy, overall and per
style (targets >= 0.9). Unstyled prompts ("a star"): the share of each style among the samples; the largest should
be <= 0.3 (a balanced mixture, not a collapsed model). Prints the numbers, optionally as JSON, and can save a
labelled grid to check by eye.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from PIL import Image, ImageDraw

from stylealigned.backbones import backbone_for
from stylealigned.models import load_pipeline
from stylealigned.toy import world
from stylealigned.toy.classifier import classify, load_classifier

TILE, LABEL_HEIGHT = 128, 30


def generate(pipe, prompts: list[str], args) -> list[Image.Image]:
    """One image per prompt, in batches, image i seeded by `args.seed + i`."""
    images = []
    for start in range(0, len(prompts), args.batch):
        batch = prompts[start:start + args.batch]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
        settings = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": world.SIZE,
                    "width": world.SIZE}
        settings = backbone_for(pipe).pipeline_inputs(settings)  # FLUX: true CFG
        images += pipe(batch, generator=generators, **settings).images
    return images


def labelled_grid(images, captions, columns: int = 8) -> Image.Image:
    """Tiles upscaled to 128 px, each with its caption and the classifier's verdict below."""
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + LABEL_HEIGHT)
        grid.paste(image.resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + TILE + 1), caption, fill="black", spacing=1)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--per-pair", type=int, default=2, help="samples per styled (object, style) prompt")
    parser.add_argument("--per-object", type=int, default=12, help="samples per unstyled object prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", help="save a labelled grid here: one sample per styled pair, then 12 unstyled")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)

    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    pairs = [(o, s) for o in world.OBJECTS for s in world.STYLES] * args.per_pair
    styled = generate(pipe, [world.styled_caption(o, s) for o, s in pairs], args)
    objects, styles = classify(styled, classifier)
    unstyled_objects = list(world.OBJECTS) * args.per_object
    unstyled = generate(pipe, [world.unstyled_caption(o) for o in unstyled_objects], args)
    free_objects, free_styles = classify(unstyled, classifier)

    shares = {s: n / len(free_styles) for s, n in Counter(free_styles).most_common()}
    report = {
        "styled_object_accuracy": sum(p == o for p, (o, _) in zip(objects, pairs)) / len(pairs),
        "styled_style_accuracy": sum(p == s for p, (_, s) in zip(styles, pairs)) / len(pairs),
        "styled_style_accuracy_per_style": {
            style: sum(p == s for p, (_, s) in zip(styles, pairs) if s == style) / (len(pairs) // len(world.STYLES))
            for style in world.STYLES},
        "unstyled_object_accuracy": sum(p == o for p, o in zip(free_objects, unstyled_objects)) / len(unstyled),
        "unstyled_max_style_share": max(shares.values()),
        "unstyled_style_shares": shares,
        "samples": {"styled": len(styled), "unstyled": len(unstyled)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value if not isinstance(value, float) else round(value, 3)}")
    if args.grid:
        captions = [f"{o} {s}\n-> {po} {ps}" for (o, s), po, ps in zip(pairs, objects, styles)][:36]
        captions += [f"{o} (no style)\n-> {po} {ps}"
                     for o, po, ps in zip(unstyled_objects, free_objects, free_styles)][:12]
        labelled_grid(styled[:36] + unstyled[:12], captions).save(args.grid)


if __name__ == "__main__":
    main()
