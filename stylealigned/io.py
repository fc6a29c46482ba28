"""Images and clips in and out: robust loading, PNGs with metadata and MP4s written atomically, grids, contact
sheets, output folders."""

import json
import os
import re
import shutil
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import UserError

MAX_PIXELS = 100_000_000  # larger images are refused as possible decompression bombs
WHITE = (255, 255, 255)
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")  # a reference with one of these is a clip


def load_image(path, width: int, height: int) -> Image.Image:
    """Read an image as RGB, upright (EXIF), transparency on white, center-cropped and resized to width x height."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such image file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; pass a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS below is the limit
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError
                image.load()  # a full decode, so truncation is caught here
                image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise UserError(f"{path} is too large (over {MAX_PIXELS // 1_000_000} megapixels); resize it first") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image Pillow can read; pass a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UserError(f"{path} is corrupt or truncated ({error}); re-export the image".replace("\n", " ")) from None
    return ImageOps.fit(to_rgb(image), (width, height), Image.Resampling.LANCZOS)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit integer images scaled to 8 bits, transparent pixels composited on white."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or pixels.max() > 255:  # 16-bit data; 8-bit data stored as "I" is kept as is
            pixels = pixels / 257
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        background.alpha_composite(image.convert("RGBA"))
        image = background
    return image.convert("RGB")


def write_atomic(path, write) -> None:
    """Call write(file_object) on a temporary file next to `path`, then move it into place in one step."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask like any other tool
        os.replace(temporary, path)
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, OSError):  # name the file we meant to write, not the temporary one
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image: Image.Image, path, metadata: dict) -> None:
    """Save atomically as PNG with `metadata` as JSON in the "stylealigned" text chunk (and "prompt" if given)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("stylealigned", json.dumps(metadata, default=str))
    if "prompt" in metadata:
        info.add_text("prompt", str(metadata["prompt"]))
    write_atomic(path, lambda file: image.save(file, format="PNG", pnginfo=info))


def save_video(frames: Sequence[Image.Image], path, fps: int) -> None:
    """Save PIL frames atomically as an H.264 MP4 at `fps`, through diffusers' `export_to_video` (imageio with
    imageio-ffmpeg's ffmpeg)."""
    from diffusers.utils import export_to_video

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        temporary = Path(folder) / path.name
        export_to_video(list(frames), str(temporary), fps=fps)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)


def read_video(path, frames: int | None = None) -> list[Image.Image]:
    """The frames of a video file (its first `frames`, if given), as RGB PIL images."""
    import itertools

    import imageio.v3 as iio

    return [Image.fromarray(frame).convert("RGB")
            for frame in itertools.islice(iio.imiter(path, plugin="FFMPEG"), frames)]


def is_video(path) -> bool:
    """Whether `path` names a video file (by its suffix): a clip, not a still image."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def load_clip(path, width: int, height: int, frames: int) -> list[Image.Image]:
    """The first `frames` frames of a video file, each center-cropped and resized to width x height as
    `load_image` does; a missing, unreadable or shorter file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such video file: {path}")
    try:
        clip = read_video(path, frames)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(f"{path} is not a video ffmpeg can read ({error}); pass an MP4".replace("\n", " ")) from None
    if len(clip) < frames:
        raise UserError(f"{path} has {len(clip)} frames but the clips have {frames}; pass a longer clip or fewer "
                        "--frames")
    return [ImageOps.fit(frame, (width, height), Image.Resampling.LANCZOS) for frame in clip]


def contact_sheet(clips: Sequence[Sequence[Image.Image]], labels: Sequence[str], per_clip: int = 4) -> Image.Image:
    """One row per clip (clips of one length) of up to `per_clip` frames spread evenly from the first to the last,
    each captioned with its frame number, the clip's label left of its row."""
    last = len(clips[0]) - 1
    picked = sorted({round(k * last / max(per_clip - 1, 1)) for k in range(per_clip)})
    return make_grid([clip[index] for clip in clips for index in picked], len(picked),
                     labels=[f"frame {index}" for _ in clips for index in picked],
                     row_labels=[_fit(label, ImageFont.load_default(), 160) for label in labels])


def read_png_metadata(path) -> dict:
    """The metadata dict that save_png stored in `path` ({} when there is none)."""
    with Image.open(path) as image:
        return json.loads(image.text.get("stylealigned", "{}"))


def write_json_atomic(path, data) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    write_atomic(path, lambda file: file.write(text.encode()))


def make_grid(images: list, columns: int, labels: list | None = None, row_labels: list | None = None) -> Image.Image:
    """Tile images (resized to the first one's size) in `columns`; optional captions under cells and left of rows."""
    font = ImageFont.load_default()
    cell_w, cell_h = images[0].size
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    text_h = font.getbbox("Ag")[3]
    caption_h = text_h + 6 if labels else 0
    margin = int(max(font.getlength(label) for label in row_labels)) + 8 if row_labels else 0
    grid = Image.new("RGB", (margin + columns * cell_w, rows * (cell_h + caption_h)), WHITE)
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x, y = margin + index % columns * cell_w, index // columns * (cell_h + caption_h)
        grid.paste(image.convert("RGB").resize((cell_w, cell_h)), (x, y))
        if labels:
            draw.text((x + 3, y + cell_h + 3), _fit(labels[index], font, cell_w - 6), fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        draw.text((4, row * (cell_h + caption_h) + (cell_h - text_h) // 2), label, fill="black", font=font)
    return grid


def _fit(text: str, font, width: int) -> str:
    """`text` shortened with an ellipsis to at most `width` pixels wide (a binary search: long prompts stay fast)."""
    if font.getlength(text) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if font.getlength(text[:middle] + "…") <= width else (low, middle)
    return text[:low] + "…" if font.getlength(text[:low] + "…") <= width else ""


def slugify(text: str, max_len: int = 40) -> str:
    """File-name slug, cut at a word boundary: "A cat, in watercolor!" -> "a-cat-in-watercolor"."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if len(slug) > max_len:
        slug = slug[: max_len + 1].rsplit("-", 1)[0] if "-" in slug[: max_len + 1] else slug[:max_len]
    return slug or "image"


def image_filename(position: int, prompt: str) -> str:
    """`NN-<slug>.png`: how a set's image at `position` is named in a run folder (00 is the reference)."""
    return f"{position:02d}-{slugify(prompt)}.png"


ASIDE = ".stylealigned-earlier"  # where --overwrite keeps an earlier run's files until the new run has written one


def writable_folder(path: Path, what: str) -> None:
    """`path` is a folder this process can write in (created if missing), else a UserError naming it as `what`."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise UserError(f"cannot write to {what} {path}: {error.strerror}; choose another --out") from None


def prepare_output_dir(path, overwrite: bool = False, resume: bool = False, outputs: Sequence[str] = (),
                       record: str = "run.json", listed: Callable[[dict], list] = lambda data: data.get("files", []),
                       resumable: bool = True):
    """Create the output folder; earlier results there need `resume` (keep them) or `overwrite`.

    Overwriting moves only the files the earlier `record` lists (`listed(its JSON)`) into the hidden folder ASIDE
    (`discard_earlier` deletes them, `restore_earlier` puts them back), and refuses when one of the `outputs` this
    run will write is there without being listed, or a listed name is a folder: nothing else is ever touched.
    `resumable`: whether the command has --resume, which the message for a used folder then suggests.
    Our own temporary files left by a killed run are deleted.
    """
    path = Path(path)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one of them")
    writable_folder(path, "output folder")
    earlier = (path / record).exists() or any(path.glob("*.png"))
    if earlier and not (overwrite or resume):
        hint = " or --resume to complete them" if resumable else ""
        raise UserError(f"{path} holds earlier results; pass --overwrite to replace them{hint}, or choose another --out")
    ours = _listed(path / record, listed) if overwrite else []
    fresh = overwrite or not (path / record).exists()  # else a resume, whose record run.json's checks compare
    foreign = [name for name in [*outputs, record] if fresh and _exists(path / name) and name not in ours]
    foreign += [name for name in ours if (path / name).is_dir() and not (path / name).is_symlink()]
    if foreign:
        raise UserError(f"{path / foreign[0]} was not written by stylealigned (no earlier {record} there lists it "
                        "as a file); move it away or choose another --out")
    _remove_temporaries(path, [*outputs, *ours, record])
    discard_earlier(path)
    if ours:
        (path / ASIDE).mkdir()
        for name in ours:
            if _exists(path / name):
                os.replace(path / name, path / ASIDE / name)
    return path


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove_temporaries(path: Path, names: Sequence[str]) -> None:
    """Delete the temporary files write_atomic leaves when killed mid-write: `.NAME.XXXXXXXX.tmp` for our names."""
    pattern = re.compile("|".join(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp" for name in names))
    for file in path.iterdir():
        if pattern.fullmatch(file.name) and file.is_file() and not file.is_symlink():
            file.unlink()


def discard_earlier(path) -> None:
    """Delete the earlier run's files that prepare_output_dir set aside (once the new run has written one)."""
    aside = Path(path) / ASIDE
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)


def restore_earlier(path) -> None:
    """Put the earlier run's files back (the new run failed before writing any), replacing our new record."""
    aside = Path(path) / ASIDE
    if aside.is_dir() and not aside.is_symlink():
        for file in aside.iterdir():
            os.replace(file, Path(path) / file.name)
        aside.rmdir()


def _listed(record: Path, listed: Callable[[dict], list]) -> list[str]:
    """The plain file names an earlier record lists as ours, the record itself last; none for a foreign record."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        names = [name for name in listed(data) if isinstance(name, str) and name not in ("", ".", "..")
                 and Path(name).name == name]
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    return names + [record.name]
