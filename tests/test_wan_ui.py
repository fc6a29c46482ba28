"""The web app on the tiny Wan pipeline: a set of clips through the named endpoint, a player per clip, the zip of
MP4s, and clip options it refuses with a message."""

import json
import zipfile

import pytest

gradio_client = pytest.importorskip("gradio_client")

from stylealigned.io import read_video  # noqa: E402
from tests.test_ui import free_port  # noqa: E402
from tests.wan_pipelines import WAN_HEIGHT, WAN_WIDTH, load_wan  # noqa: E402

CLIP = dict(steps=2, width=WAN_WIDTH, height=WAN_HEIGHT, frames=5, fps=8)


@pytest.fixture(scope="module")
def client(tiny_wan_paths, tmp_path_factory):
    from stylealigned.ui import Limits, launch

    page = launch(load_wan(tiny_wan_paths[2]), "tiny-wan", tmp_path_factory.mktemp("ui"), Limits(max_side=256),
                  port=free_port(), block=False)
    yield gradio_client.Client(page.local_url, verbose=False)
    page.close()


def test_a_set_of_clips_comes_back_as_players_and_a_zip_of_mp4s(client, tmp_path):
    gallery, archive, status = client.predict(prompts="a cat\na dog", style="flat", **CLIP,
                                              api_name="/generate_set")
    assert [item["caption"] for item in gallery] == ["0: a cat, flat", "1: a dog, flat"]
    assert all(item.get("video") for item in gallery) and "Done: 2 clips" in status
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
        names = sorted(name.split("/", 1)[1] for name in zipped.namelist())
    assert names == ["00-a-cat-flat.mp4", "01-a-dog-flat.mp4", "grid.png", "run.json"]
    folder = next(tmp_path.iterdir())
    record = json.loads((folder / "run.json").read_text())
    assert record["parameters"]["num_frames"] == 5 and record["parameters"]["fps"] == 8
    frames = read_video(folder / "01-a-dog-flat.mp4")
    assert len(frames) == 5 and frames[0].size == (WAN_WIDTH, WAN_HEIGHT)


@pytest.mark.parametrize("values, message", [({"frames": 6}, "one more than a multiple of 4"),
                                             ({"fps": 0}, "less than minimum value 1")])
def test_bad_clip_options_come_back_as_messages(client, values, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(prompts="a cat\na dog", **(CLIP | values), api_name="/generate_set")
