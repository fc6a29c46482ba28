"""The local web page: the form, a set generated through it, and a bad value reported on the page."""

import base64
import io
import re
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from stylealigned.ui import serve


@pytest.fixture
def page_url(sd_pipe):
    server = serve(sd_pipe, "tiny", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def post(url, **fields):
    form = {"prompts": "a cat\na dog\na house", "style": "watercolor", "seed": "1", "steps": "2", "guidance": "5",
            "shared_layers": "1.0", "shared_score_scale": "1.0", "shared_score_shift": "0.0",
            "share_attention": "on", "adain_queries": "on", "adain_keys": "on"} | fields
    data = urllib.parse.urlencode(form).encode()
    try:
        with urllib.request.urlopen(f"{url}/generate", data=data, timeout=120) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_form_is_served(page_url):
    with urllib.request.urlopen(page_url, timeout=30) as reply:
        page = reply.read().decode()
    assert reply.status == 200 and '<form method="post" action="/generate">' in page
    assert 'name="share_attention" checked' in page and 'name="adain_values">' in page


def test_a_set_comes_back_as_images(page_url):
    status, page = post(page_url)
    assert status == 200
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in re.findall(r"base64,([^\"]+)", page)]
    assert [im.size for im in images] == [(32, 32)] * 3
    assert "a dog, watercolor" in page


@pytest.mark.parametrize("fields, message", [({"shared_score_scale": "-2"}, "shared_score_scale"),
                                             ({"steps": "many"}, "number"), ({"prompts": "  "}, "prompt")])
def test_bad_values_are_reported_on_the_page(page_url, fields, message):
    status, page = post(page_url, **fields)
    assert status == 400 and 'class="error"' in page and message in page
