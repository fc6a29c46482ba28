"""The web app over HTTP: its named endpoint through gradio_client, hostile clients, and failures as messages."""

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")

from stylealigned.cli import main  # noqa: E402

PROMPTS = "a circle\na square\na triangle"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_app(out, **limits):
    """The app with the built-in model on a free port, serving from a thread; returns the gr.Blocks."""
    from stylealigned.models import load_pipeline
    from stylealigned.ui import Limits, launch

    pipe = load_pipeline("builtin", device="cpu")
    return launch(pipe, "builtin", out, Limits(**limits), port=free_port(), block=False)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("ui")


@pytest.fixture(scope="module")
def app(out):
    page = serve_app(out, max_prompts=8, max_steps=20, max_upload="1mb")
    yield page
    page.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.local_url, verbose=False)


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.status, reply.read().decode()


def test_the_named_endpoint_makes_a_set_and_its_zip(client, app):
    gallery, archive, status = client.predict(prompts=PROMPTS, style="flat", steps=3, api_name="/generate_set")
    assert [item["caption"] for item in gallery] == ["0: a circle, flat", "1: a square, flat", "2: a triangle, flat"]
    with zipfile.ZipFile(archive) as zipped:
        names = sorted(name.split("/", 1)[1] for name in zipped.namelist())
        record = json.loads(next(zipped.read(n) for n in zipped.namelist() if n.endswith("run.json")))
    assert names == ["00-a-circle-flat.png", "01-a-square-flat.png", "02-a-triangle-flat.png", "grid.png", "run.json"]
    assert record["complete"] and record["parameters"]["num_inference_steps"] == 3 and "Done: 3 images" in status


def test_progress_comes_per_step_of_the_inversion_and_the_denoising(client, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 60, 200)).save(tmp_path / "blue.png")
    job = client.submit(reference=gradio_client.handle_file(str(tmp_path / "blue.png")), reference_prompt="a square",
                        prompts="a circle", steps=20, api_name="/transfer")
    seen = set()
    while not job.done():
        seen |= {(unit.desc, unit.index) for unit in job.status().progress_data or () if unit.length == 20}
        time.sleep(0.01)
    job.result()
    for stage in ("inverting", "denoising"):
        assert len({step for desc, step in seen if desc == stage}) > 1, seen


def test_runs_never_overwrite_each_other(client, app):
    folders = {client.predict(prompts="a circle\na square", steps=2, api_name="/generate_set")[2] for _ in range(2)}
    assert len(folders) == 2


def test_the_page_is_served_while_a_connection_idles(app):
    host, port = app.server_name, app.server_port
    idle = socket.create_connection((host, port))
    idle.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never finishes the request
    try:
        status, page = get(app.local_url)
        assert status == 200 and "stylealigned" in page
    finally:
        idle.close()


def test_an_oversized_upload_is_refused_with_a_message(app):
    claim = socket.create_connection((app.server_name, app.server_port), timeout=10)
    claim.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: 10000000000\r\n\r\n"
                  b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
                  b"Content-Type: image/png\r\n\r\n" + b"a" * 1_200_000)
    reply = b""
    while b"bytes." not in reply and (part := claim.recv(4096)):  # the headers and the message may come apart
        reply += part
    claim.close()
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "maximum allowed size" in reply
    assert get(app.local_url)[0] == 200


@pytest.mark.parametrize("values, message", [
    ({"steps": 999}, "greater than maximum value 20"),
    ({"prompts": "\n".join(["a circle"] * 9)}, "over this server's limit of 8"),
    ({"prompts": "  "}, "at least one prompt"),
    ({"preset": "custom", "shared_layers": "no such layer"}, "matches no attention layer"),
])
def test_bad_and_over_limit_jobs_come_back_as_messages(client, values, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(**{"prompts": PROMPTS, "steps": 2, **values}, api_name="/generate_set")


def test_a_failed_generation_is_a_message_and_the_server_stays_up(client, app, monkeypatch):
    import stylealigned.sets

    def broken(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(stylealigned.sets, "generate_set", broken)
    with pytest.raises(gradio_client.exceptions.AppError, match="Generation failed.*the device fell over"):
        client.predict(prompts=PROMPTS, steps=2, api_name="/generate_set")
    monkeypatch.undo()
    assert len(client.predict(prompts=PROMPTS, steps=2, api_name="/generate_set")[0]) == 3


def join(app, origin, content_type="application/json"):
    """POST a job to the queue as a page from `origin` would; the status code."""
    body = json.dumps({"data": ["text-to-image"], "fn_index": 0,  # event 0: the preset radio's change
                       "session_hash": "x", "trigger_id": None}).encode()
    request = urllib.request.Request(f"{app.local_url}gradio_api/queue/join", data=body, method="POST",
                                     headers={"Content-Type": content_type, "Origin": origin})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers.get("Access-Control-Allow-Origin")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Access-Control-Allow-Origin")


def preflight(app, origin):
    request = urllib.request.Request(f"{app.local_url}gradio_api/queue/join", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.headers.get("Access-Control-Allow-Origin")


def test_a_cross_origin_request_is_rejected(app):
    # A foreign page's JSON POST needs a preflight, which Gradio answers without allowing the origin, so the browser
    # never sends it; the POSTs a page may send without a preflight (a form's types) are refused by the endpoint.
    assert preflight(app, "http://evil.example") is None
    assert preflight(app, "http://127.0.0.1:1234") == "http://127.0.0.1:1234"
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        status, allowed = join(app, "http://evil.example", kind)
        assert status >= 400 and allowed is None
    assert join(app, "http://evil.example")[1] is None  # nor may it read any answer


def test_without_gradio_one_line_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    monkeypatch.delitem(sys.modules, "stylealigned.ui", raising=False)
    monkeypatch.setattr(sys, "argv", ["stylealigned", "ui"])
    with pytest.raises(SystemExit) as exit:
        main()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit.value.code == 2 and len(errors) == 1 and 'pip install "stylealigned[ui]"' in errors[0]


def test_the_reference_tab_makes_a_set_from_an_upload(client, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    gallery, archive, _ = client.predict(reference=gradio_client.handle_file(str(tmp_path / "red.png")),
                                         reference_prompt="a red square", prompts="a circle", steps=3,
                                         inversion="noise", api_name="/transfer")
    assert [item["caption"] for item in gallery] == ["reference (input)", "0: a red square", "1: a circle"]
    assert zipfile.ZipFile(archive).testzip() is None


@pytest.mark.parametrize("family", ["flux", "sd3", "flux2", "builtin_flux"])
def test_transformer_backbones_work_in_the_app_unchanged(family, request, tmp_path):
    from PIL import Image

    from stylealigned.ui import App

    pipe = request.getfixturevalue(f"{family}_pipe")
    page = App(pipe, family, tmp_path).build()
    page.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(page.local_url, verbose=False)
        gallery, _, status = client.predict(prompts="a cat\na dog", steps=2, api_name="/generate_set")
        assert len(gallery) == 2 and "Done: 2 images" in status
        image = tmp_path / "reference.png"
        Image.open(gallery[0]["image"]).save(image)
        gallery, _, _ = client.predict(reference=gradio_client.handle_file(str(image)), reference_prompt="a cat",
                                       prompts="a dog", steps=2, api_name="/transfer")
        assert [item["caption"] for item in gallery] == ["reference (input)", "0: a cat", "1: a dog"]
    finally:
        page.close()


class Gate:
    """A denoiser pre-hook: lets `free` calls through, then holds the next one until `open` is set, noting the
    job's stop event (the worker thread's STOP) as it holds."""

    def __init__(self, free: int):
        self.free, self.calls, self.stop = free, 0, None
        self.held, self.open = threading.Event(), threading.Event()

    def __call__(self, module, args):
        from stylealigned.ui import STOP

        self.calls += 1
        if self.calls == self.free + 1:
            self.stop = STOP.get()
            self.held.set()
            assert self.open.wait(WAIT)


WAIT = 120  # seconds: only a broken mechanism waits this long, and then the test fails instead of hanging


def wait_until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.01)


@pytest.fixture
def gated(tmp_path):
    """An app whose denoiser holds its third call: (the App, its page, the gate, its out folder)."""
    from stylealigned.models import load_pipeline
    from stylealigned.ui import App

    pipe = load_pipeline("builtin", device="cpu")
    gate = Gate(free=2)
    pipe.unet.register_forward_pre_hook(gate)
    app = App(pipe, "builtin", tmp_path / "out")
    page = app.build()
    page.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield app, page, gate, tmp_path / "out"
    gate.open.set()
    page.close()


def blue_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 60, 200)).save(tmp_path / "blue.png")
    return gradio_client.handle_file(str(tmp_path / "blue.png"))


def run_folders(out):
    return [path for path in out.glob("*") if path.is_dir() and not path.name.startswith(".")]


def test_cancel_stops_its_own_job_during_the_inversion_and_not_another_tabs(gated, tmp_path):
    _, page, gate, out = gated
    tab, other_tab = (gradio_client.Client(page.local_url, verbose=False) for _ in range(2))
    job = tab.submit(reference=blue_image(tmp_path), reference_prompt="a square", prompts="a circle", steps=20,
                     api_name="/transfer")
    assert gate.held.wait(WAIT)  # inverting, step 3 of 20
    other = other_tab.submit(prompts=PROMPTS, steps=2, api_name="/generate_set")  # queued behind it
    job.cancel()
    wait_until(gate.stop.is_set)
    gate.open.set()
    gallery, _, status = other.result()
    assert len(gallery) == 3 and "Done: 3 images" in status
    [folder] = run_folders(out)  # the transfer stopped in its inversion: it never made a run folder
    assert folder.name.endswith("a-circle")


def test_cancel_on_one_tab_leaves_the_running_job_of_another(gated):
    _, page, gate, _ = gated
    tab, other_tab = (gradio_client.Client(page.local_url, verbose=False) for _ in range(2))
    running = tab.submit(prompts=PROMPTS, steps=5, api_name="/generate_set")
    assert gate.held.wait(WAIT)
    queued = other_tab.submit(prompts="a square", steps=2, api_name="/generate_set")
    queued.cancel()
    gate.open.set()
    assert "Done: 3 images" in running.result()[2] and not gate.stop.is_set()


def test_a_client_that_disconnects_has_its_job_stopped(gated):
    import http.client

    app, page, gate, out = gated
    parameters = gradio_client.Client(page.local_url, verbose=False).view_api(
        print_info=False, return_format="dict")["named_endpoints"]["/generate_set"]["parameters"]
    values = {p["parameter_name"]: p["parameter_default"] for p in parameters} | {"prompts": PROMPTS, "steps": 20}
    body = json.dumps({"data": list(values.values())})
    connection = http.client.HTTPConnection(page.server_name, page.server_port, timeout=WAIT)
    connection.request("POST", "/gradio_api/call/generate_set", body, {"Content-Type": "application/json"})
    event = json.loads(connection.getresponse().read())["event_id"]
    connection.request("GET", f"/gradio_api/call/generate_set/{event}")
    connection.getresponse()
    assert gate.held.wait(WAIT)
    connection.close()  # the client goes away mid-job
    wait_until(gate.stop.is_set)
    gate.open.set()
    wait_until(lambda: not app.device.locked())
    assert [list(folder.glob("*.png")) for folder in run_folders(out)] == [[]]


def test_knobs_given_without_the_custom_preset_win(client, out):
    before = set(run_folders(out))
    client.predict(prompts="a circle\na square", steps=2, share_attention=False, shared_score_shift=5,
                   api_name="/generate_set")
    [folder] = set(run_folders(out)) - before  # Gradio's cache (.gradio) may appear beside it
    config = json.loads((folder / "run.json").read_text())["parameters"]["config"]
    assert config["share_attention"] is False and config["shared_score_shift"] == 5


def test_gradio_keeps_its_copies_under_out_and_deletes_them(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # as in a process of its own (an earlier app set it)
    page, cache = serve_app(tmp_path / "out"), tmp_path / "out" / ".gradio"
    try:
        client = gradio_client.Client(page.local_url, verbose=False)
        _, archive, _ = client.predict(reference=blue_image(tmp_path), reference_prompt="a square",
                                       prompts="a circle", steps=2, inversion="noise", api_name="/transfer")
        copies = {path.name for path in cache.rglob("*") if path.is_file()}
        assert {"blue.png", "00-a-square.png", "01-a-circle.png", Path(archive).name} <= copies  # uploads too
    finally:
        page.close()
    assert not [path for path in cache.rglob("*") if path.is_file()]


def test_a_transfer_without_targets_is_refused_before_the_inversion(gated, tmp_path):
    _, page, gate, out = gated
    client = gradio_client.Client(page.local_url, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match="at least one target prompt"):
        client.predict(reference=blue_image(tmp_path), reference_prompt="a square", prompts=" \n ", steps=2,
                       api_name="/transfer")
    assert gate.calls == 0 and not run_folders(out)


@pytest.mark.parametrize("values, message", [
    ({"preset": "custom", "full_attention_share": True, "batch_size": 1},
     "cannot run in batches; drop batch size or full attention share$"),
    ({"steps": 2.5}, "^steps must be a whole number, got 2.5"),
    ({"width": 64.5}, "^width must be a whole number"),
])
def test_messages_name_the_fields_and_numbers_are_whole(client, values, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(**{"prompts": PROMPTS, "steps": 2, **values}, api_name="/generate_set")


@pytest.mark.parametrize("content", [b"just some text\n", b"huge header"])
def test_an_upload_that_is_no_image_is_one_sentence(client, tmp_path, content):
    path = tmp_path / "upload.png"
    if content == b"huge header":  # a PNG header claiming 30000 x 30000 pixels
        import struct
        import zlib

        header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
        content = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(
            ">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(content)
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        client.predict(reference=gradio_client.handle_file(str(path)), reference_prompt="a square",
                       prompts="a circle", steps=2, api_name="/transfer")
    assert str(error.value).startswith("The reference is not an image this app can read;")
    assert str(error.value).count(".") == 1 and "preprocess" not in str(error.value)


@pytest.mark.parametrize("family, queries", [("sd", True), ("flux", False)])
def test_the_knobs_show_the_family_values(family, queries, request):
    """A knob left to the family shows what this model will run: AdaIN of the queries on UNets, not on FLUX."""
    from stylealigned.backbones import backbone_for
    from stylealigned.config import KNOBS
    from stylealigned.ui import preset_values

    backbone = backbone_for(request.getfixturevalue(f"{family}_pipe"))
    for preset in ("text-to-image", "transfer"):
        values = dict(zip(KNOBS, preset_values(preset, backbone)))
        assert values["adain_queries"] is queries and values["share_until"] == 0.0
