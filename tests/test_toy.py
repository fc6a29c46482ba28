"""The synthetic world, its classifier and the shipped built-in model."""

import itertools
from collections import Counter

import numpy as np
import torch

from stylealigned.models import load_pipeline
from stylealigned.toy import world
from stylealigned.toy.classifier import ShapeStyleClassifier, classify, load_classifier, to_tensor


def test_sample_is_deterministic_per_seed():
    first, again, other = world.sample(7), world.sample(7), world.sample(8)
    assert (first.object, first.style) == (again.object, again.style)
    np.testing.assert_array_equal(np.asarray(first.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_every_object_renders_in_every_style():
    for shape, style in itertools.product(world.OBJECTS, world.STYLES):
        image = world.render(shape, style, np.random.default_rng(0))
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, np.int16)
        drawn = np.abs(pixels - pixels[0, 0]).sum(-1) > 30  # differs from the background colour
        assert 0.05 < drawn.mean() < 0.6, (shape, style)


def test_styles_differ_in_colour_and_objects_differ_in_coverage():
    def mean_colour(style):
        return np.mean([np.asarray(world.render(s, style, np.random.default_rng(1)), np.float32).mean((0, 1))
                        for s in world.OBJECTS], axis=0)

    colours = {style: mean_colour(style) for style in world.STYLES}
    for a, b in itertools.combinations(world.STYLES, 2):
        assert np.linalg.norm(colours[a] - colours[b]) > 20, (a, b)
    masks = {s: np.asarray(world.render(s, "pastel", np.random.default_rng(2)).convert("L")) < 250
             for s in world.OBJECTS}
    for a, b in itertools.combinations(world.OBJECTS, 2):
        assert (masks[a] != masks[b]).mean() > 0.02, (a, b)


def test_caption_mix_and_vocabulary():
    rng = np.random.default_rng(0)
    captions = [world.caption("star", "neon", rng) for _ in range(2000)]
    counts = Counter(captions)
    assert set(counts) == {"a star in neon style", "a star", ""}
    assert abs(counts["a star in neon style"] / 2000 - world.CAPTION_MIX["styled"]) < 0.04
    assert abs(counts[""] / 2000 - world.CAPTION_MIX["empty"]) < 0.03
    words = {w for s, o in itertools.product(world.STYLES, world.OBJECTS) for w in world.styled_caption(o, s).split()}
    assert words == set(world.vocabulary())


def test_classifier_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ShapeStyleClassifier(width=8).eval()
    model.save(tmp_path)
    pixels = to_tensor([world.sample(i).image for i in range(3)])
    for expected, actual in zip(model(pixels), load_classifier(tmp_path)(pixels)):
        torch.testing.assert_close(actual, expected)


def test_shipped_classifier_knows_fresh_renders():
    samples = [world.sample(10**12 + i) for i in range(60)]
    objects, styles = classify([s.image for s in samples])
    assert np.mean([o == s.object for o, s in zip(objects, samples)]) >= 0.9
    assert np.mean([p == s.style for p, s in zip(styles, samples)]) >= 0.95


def test_builtin_model_loads_offline_and_generates():
    pipe = load_pipeline("builtin", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a star in neon style", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 1
