"""Image input and output: every kind of file users pass in, atomic PNG/JSON writing, grids, output folders."""

import json
import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

import stylealigned.io
from stylealigned.errors import UserError
from stylealigned.io import (
    discard_earlier,
    load_image,
    make_grid,
    prepare_output_dir,
    read_png_metadata,
    restore_earlier,
    save_png,
    slugify,
    write_json_atomic,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def solid(mode, size, color) -> Image.Image:
    return Image.new(mode, size, color)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(0, (0, 0, 10, 20))  # left half: index 0, transparent
    image.info["transparency"] = 0
    return image


# (file name, image, save options, expected RGB of the left and right edge after loading, tolerance)
CASES = {
    "rgb.png": (solid("RGB", (60, 40), (200, 100, 50)), {}, (200, 100, 50), (200, 100, 50), 0),
    "rgb.jpg": (solid("RGB", (60, 40), (200, 100, 50)), {"quality": 95}, (200, 100, 50), (200, 100, 50), 3),
    "rgb.webp": (solid("RGB", (60, 40), (200, 100, 50)), {"lossless": True}, (200, 100, 50), (200, 100, 50), 0),
    "clear.png": (solid("RGBA", (20, 20), (0, 0, 0, 0)), {}, (255, 255, 255), (255, 255, 255), 0),
    "half-alpha.png": (solid("RGBA", (20, 20), (255, 0, 0, 128)), {}, (255, 127, 127), (255, 127, 127), 1),
    "la.png": (solid("LA", (20, 20), (0, 0)), {}, (255, 255, 255), (255, 255, 255), 0),
    "palette.png": (palette_with_transparency(), {}, (255, 255, 255), RED, 0),
    "palette.gif": (palette_with_transparency(), {}, (255, 255, 255), RED, 0),
    "gray.png": (solid("L", (20, 20), 77), {}, (77, 77, 77), (77, 77, 77), 0),
    "gray16.png": (solid("I;16", (20, 20), 128 * 257), {}, (128, 128, 128), (128, 128, 128), 0),
    "cmyk.jpg": (solid("CMYK", (20, 20), (0, 255, 255, 0)), {"quality": 95}, RED, RED, 3),
}


@pytest.mark.parametrize("name", CASES)
def test_every_kind_becomes_rgb(tmp_path, name):
    image, options, left, right, tolerance = CASES[name]
    image.save(tmp_path / name, **options)
    loaded = load_image(tmp_path / name, 16, 12)
    assert loaded.mode == "RGB" and loaded.size == (16, 12)
    values = pixels(loaded)
    assert np.abs(values[6, 0] - left).max() <= tolerance
    assert np.abs(values[6, -1] - right).max() <= tolerance


def test_sixteen_bit_range_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    values = pixels(load_image(tmp_path / "ramp.png", 256, 4))[2, :, 0]
    assert values[0] == 0 and values[-1] == 255 and abs(values[128] - 128) <= 2


def test_exif_orientation_is_honoured(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # stored left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored left side becomes the top
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    values = pixels(load_image(tmp_path / "rotated.jpg", 20, 40))
    assert np.abs(values[5, 10] - RED).max() < 10 and np.abs(values[-5, 10] - BLUE).max() < 10


def test_other_aspect_is_center_cropped(tmp_path):
    wide = Image.new("RGB", (120, 40), BLUE)
    wide.paste(RED, (40, 0, 80, 40))  # only the middle square is red
    wide.save(tmp_path / "wide.png")
    values = pixels(load_image(tmp_path / "wide.png", 16, 16))
    assert np.abs(values[:, 2:-2] - RED).max() <= 2


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header says width x height (the pixel data is one empty chunk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer := BytesIO(), format="PNG")
    return buffer.getvalue()[:2000]


@pytest.mark.parametrize("name, content, message", [
    ("missing.png", None, "no such image file"),
    ("empty.png", b"", "is empty"),
    ("noise.png", bytes(range(256)) * 4, "not an image Pillow can read"),
    ("notes.jpg", b"just some text\n", "not an image Pillow can read"),
    ("truncated.png", truncated_png(), "corrupt or truncated"),
    ("bomb.png", png_claiming_size(200_000, 200_000), "too large"),
])
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as caught:
        load_image(tmp_path / name, 16, 16)
    assert "\n" not in str(caught.value)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_image(tmp_path, 16, 16)


def test_pixel_limit(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    monkeypatch.setattr(stylealigned.io, "MAX_PIXELS", 399)
    with pytest.raises(UserError, match="too large"):
        load_image(tmp_path / "small.png", 16, 16)


def test_png_metadata_round_trip(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    metadata = {"prompt": "a cat in 水彩 style", "seed": 3, "config": {"shared_score_shift": 0.69}}
    save_png(image, tmp_path / "00-a-cat.png", metadata)
    save_png(image, tmp_path / "00-a-cat.png", metadata | {"seed": 4})  # replaces the earlier file
    assert read_png_metadata(tmp_path / "00-a-cat.png") == metadata | {"seed": 4}
    with Image.open(tmp_path / "00-a-cat.png") as reread:
        assert reread.text["prompt"] == metadata["prompt"]
        assert np.array_equal(pixels(reread), pixels(image))
    assert [path.name for path in tmp_path.iterdir()] == ["00-a-cat.png"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    write_json_atomic(tmp_path / "run.json", {"ok": 1})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_json_atomic(tmp_path / "run.json", {"bad": Unserialisable()})
    with pytest.raises(RuntimeError):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "00-x.png", {"prompt": Unserialisable()})
    assert [path.name for path in tmp_path.iterdir()] == ["run.json"]
    assert (tmp_path / "run.json").read_text() == '{\n  "ok": 1\n}\n'


def test_grid_layout_and_labels():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (32, 32), color) for color in colors]
    plain = make_grid(images, columns=2)
    assert plain.size == (64, 96)
    for index, color in enumerate(colors):
        assert plain.getpixel((index % 2 * 32 + 16, index // 2 * 32 + 16)) == color
    labelled = make_grid(images, columns=3, labels=["ref", "b", "c", "d", "e"], row_labels=["set 1", "set 2"])
    margin, row_height = labelled.width - 3 * 32, labelled.height // 2
    assert margin > 0 and row_height > 32
    assert labelled.getpixel((margin + 16, 16)) == colors[0]
    assert labelled.getpixel((margin + 16, row_height + 16)) == colors[3]
    assert pixels(labelled.crop((margin, 32, margin + 32, row_height))).min() < 128  # caption text drawn
    assert pixels(labelled.crop((0, 0, margin, 32))).min() < 128  # row label drawn


@pytest.mark.parametrize("text, slug", [
    ("A cat, in watercolor!", "a-cat-in-watercolor"),
    ("  Café   au lait  ", "cafe-au-lait"),
    ("!!!", "image"),
    ("a house in the forest under a starry night sky, oil painting", "a-house-in-the-forest-under-a-starry"),
    ("x" * 50, "x" * 40),
])
def test_slugify(text, slug):
    assert slugify(text) == slug


def test_output_dir_created_and_refused_when_holding_results(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    (out / "run.json").write_text("{}")
    with pytest.raises(UserError, match="holds earlier results.*--overwrite.*--resume"):
        prepare_output_dir(out)
    assert prepare_output_dir(out, resume=True) == out and (out / "run.json").exists()
    only_png = prepare_output_dir(tmp_path / "c")
    (only_png / "photo.png").write_bytes(b"")
    with pytest.raises(UserError, match="holds earlier results"):
        prepare_output_dir(only_png)


def test_overwrite_removes_only_the_files_run_json_lists(tmp_path):
    ours = ["00-a-cat.png", "01-a-dog.png", "grid.png"]
    theirs = ["notes.txt", "holiday.png", "00-draft.jpg", "02-mum.png"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / "run.json").write_text(json.dumps({"files": ours + ["../escape.png"]}))
    prepare_output_dir(tmp_path, overwrite=True, outputs=["00-a-tree.png", "grid.png"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(theirs + [".stylealigned-earlier"])
    restore_earlier(tmp_path)  # the new run failed before writing anything: all back as it was
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(ours + theirs + ["run.json"])
    prepare_output_dir(tmp_path, overwrite=True, outputs=["00-a-tree.png", "grid.png"])
    discard_earlier(tmp_path)  # the new run wrote its first file
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(theirs)


def test_overwrite_refuses_to_replace_a_file_it_did_not_write(tmp_path):
    (tmp_path / "00-a-cat.png").write_text("mine")
    with pytest.raises(UserError, match="00-a-cat.png was not written by stylealigned"):
        prepare_output_dir(tmp_path, overwrite=True, outputs=["00-a-cat.png"])
    (tmp_path / "run.json").write_text("not ours")
    with pytest.raises(UserError, match="run.json was not written by stylealigned"):
        prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["00-a-cat.png", "run.json"]


def test_unwritable_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to output folder .*file/out"):
        prepare_output_dir(tmp_path / "file" / "out")
    with pytest.raises(UserError, match="is a file"):
        prepare_output_dir(tmp_path / "file")


def test_overwrite_and_resume_contradict(tmp_path):
    with pytest.raises(UserError, match="contradict"):
        prepare_output_dir(tmp_path, overwrite=True, resume=True)
