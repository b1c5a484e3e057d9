"""`xtl serve` end to end: a real server over two tiny runs, driven by Chromium and by the API."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from xtl.app.uploads import MB, UploadLimits, UploadRefused, read_upload

from helpers import XTL, chromium_page, tiny_run

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
# One worker holds the server and the runs it serves.
pytestmark = pytest.mark.xdist_group("app")


# ----------------------------------------------------------------------------- files to upload


def cifar_image(cifar: Path, name: str) -> Path:
    return sorted((cifar / "test" / name).iterdir())[0]


def truncated_jpeg(path: Path, cifar: Path) -> Path:
    """A JPEG whose header is intact but whose scan data stops half way."""
    buf = io.BytesIO()
    Image.open(cifar_image(cifar, "cat")).resize((256, 256)).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def bomb_png(path: Path, width: int = 6000, height: int = 6000) -> Path:
    """A tiny PNG whose header claims width x height pixels (decoding it would need 100+ MB)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("name,score\nalice,3\n")
    return path


# ----------------------------------------------------------------------------- the checks alone


def test_upload_checks_refuse_with_a_reason(tmp_path, cifar):
    limits = UploadLimits(max_bytes=MB, max_pixels=25_000_000)
    image = read_upload(cifar_image(cifar, "cat"), limits)
    assert image.dtype.is_floating_point is False and image.shape == (3, 32, 32)
    fake = tmp_path / "photo.png"
    fake.write_bytes(os.urandom(MB + 1))
    cases = {
        not_an_image(tmp_path / "scores.csv"): "scores.csv is not an image",
        fake: "photo.png is 1.0 MB; the limit is 1 MB",
        bomb_png(tmp_path / "bomb.png"): "bomb.png is 6000 x 6000 pixels (36 megapixels); the limit is 25 megapixels",
        truncated_jpeg(tmp_path / "cut.jpg", cifar): "cut.jpg could not be decoded: the file is truncated or corrupt",
    }
    for path, message in cases.items():
        with pytest.raises(UploadRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_upload(path, limits)
    ico = tmp_path / "icon.png"
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    with pytest.raises(UploadRefused, match="icon.png is a ICO file"):
        read_upload(ico, limits)


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar):
    root = tmp_path_factory.mktemp("runs")
    served = [tiny_run(root / "cnn", cifar, "timm:resnet10t", 32), tiny_run(root / "vit", cifar, "timm:vit_tiny_patch16_224", 32)]
    (root / "report").mkdir()
    (root / "report" / "report.html").write_text("<html><body><h1>xtl report of two runs</h1></body></html>")
    return served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(log.parent / "uploads"))
    with open(log, "w") as out:
        process = subprocess.Popen([XTL, "serve", *(str(r.path) for r in runs), "--port", str(port),
                                    "--max-upload-mb", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"xtl serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"xtl serve did not answer:\n{log.read_text()}"
            try:
                if get(url)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield url
        assert process.poll() is None, f"xtl serve died:\n{log.read_text()}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def upload(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(str(path))


def choose(page, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()


def wait_for_maps(page, counts: tuple[int, int]) -> None:
    """Until model k shows counts[k] heatmaps, all loaded."""
    condition = " && ".join(f"document.querySelectorAll('#model-{k}-maps img').length === {n}" for k, n in enumerate(counts))
    condition += " && [...document.querySelectorAll('[id^=model-] img')].every(i => i.complete && i.naturalWidth > 0)"
    page.wait_for_function(condition, timeout=30_000)


def test_browser_shows_both_models_and_refuses_bad_uploads(server, runs, cifar, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    cat = cifar_image(cifar, "cat")
    big = tmp_path / "huge.png"
    big.write_bytes(os.urandom(MB + 100_000))
    with chromium_page(viewport=(1280, 1000)) as page:
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None)
        page.goto(server)
        assert "timm:resnet10t" in page.inner_text("#metrics") and "HTML report" in page.inner_text("#metrics")

        upload(page, cat)
        wait_for_maps(page, (2, 5))  # CNN: gradcam, saliency; ViT: also transformer_attribution, attnlrp, attention_rollout
        assert "Explained 0000.jpg" in page.inner_text("#status")
        for k in (0, 1):
            top5 = page.inner_text(f"#model-{k}-top5")
            assert sum(name in top5 for name in runs[0].class_names) >= 5, top5
            assert "heatmaps of class" in page.inner_text(f"#model-{k}-caption")
        captions = page.inner_text("#model-1-maps")
        assert all(m in captions for m in ("transformer_attribution", "attnlrp", "attention_rollout"))
        page.screenshot(path=ARTIFACTS / "app.png", full_page=True)
        if os.environ.get("XTL_DOCS_SCREENSHOTS"):  # refresh the README's picture on request only
            shutil.copy(ARTIFACTS / "app.png", REPO / "docs" / "images" / "app.png")

        # the opacity slider blends again without asking the models
        first_map = page.locator("#model-0-maps img").first
        before = first_map.get_attribute("src")
        page.fill("#opacity input[type=number]", "1")
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('#model-0-maps img').getAttribute('src') !== {before!r}", timeout=30_000)

        # an explicit target class: every model explains "ship"
        choose(page, "#target", "ship")
        page.wait_for_function("document.querySelector('#model-0-caption').innerText.includes('ship')", timeout=30_000)
        assert "class ship" in page.inner_text("#model-1-caption")

        # a test image of a run, from its misclassified gallery
        page.click("#pick input")
        page.get_by_role("option").filter(has_text="misclassified").first.click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('picked test image')", timeout=30_000)
        wait_for_maps(page, (2, 5))

        refusals = {
            not_an_image(tmp_path / "scores.txt"): "scores.txt is not an image",
            truncated_jpeg(tmp_path / "cut.jpg", cifar): "cut.jpg could not be decoded",
            bomb_png(tmp_path / "bomb.png"): "bomb.png is 6000 x 6000 pixels",
        }
        for path, message in refusals.items():
            upload(page, path)
            page.wait_for_function(f"document.querySelector('#status').innerText.includes({message!r})", timeout=30_000)
            assert "Upload refused" in page.inner_text("#status")
            assert page.locator("#model-0-maps img").count() == 0  # the previous answer is cleared
        page.screenshot(path=ARTIFACTS / "app_refused.png", full_page=True)

        upload(page, big)  # refused by the page before it is sent
        toast = page.locator(".toast-body").filter(has_text="exceed the maximum allowed size of 1.0 Mb")
        toast.wait_for(timeout=30_000)
        assert "huge.png" in toast.inner_text()
        page.wait_for_timeout(500)  # the toast slides in
        page.screenshot(path=ARTIFACTS / "app_too_large.png")

        upload(page, cifar_image(cifar, "ship"))  # the server still answers
        wait_for_maps(page, (2, 5))
        assert "Explained 0000.jpg" in page.inner_text("#status")
    assert outside == [], f"the page fetched from outside the machine: {outside}"


def test_two_requests_at_once_are_both_answered(server, cifar):
    from gradio_client import Client, handle_file

    def ask(name: str) -> tuple:
        client = Client(server, verbose=False, download_files=False)
        result = client.predict(handle_file(str(cifar_image(cifar, name))), ["gradcam"], "predicted", 0.5,
                                api_name="/explain_upload")
        status, labels, galleries = result[0], result[2::3], result[4::3]  # (top-5, caption, maps) per model
        top5 = [[(c["label"], round(c["confidence"], 5)) for c in label["confidences"]] for label in labels]
        return status, top5, [[item["caption"] for item in gallery] for gallery in galleries]

    alone = {name: ask(name) for name in ("cat", "ship")}
    with ThreadPoolExecutor(2) as pool:
        together = dict(zip(("cat", "ship"), pool.map(ask, ("cat", "ship"))))
    assert together == alone
    assert alone["cat"][0] == "Explained 0000.jpg."
    assert alone["cat"][2] == [["gradcam"], ["gradcam"]] and len(alone["cat"][1][0]) == 5


def test_no_request_names_a_file_on_the_server(server, runs, cifar, tmp_path):
    config = runs[0].path / "config.yaml"
    status, body = get(f"{server}gradio_api/file={config}")
    assert status in (403, 404) and "format_version" not in body
    status, body = get(f"{server}report/0")
    assert status == 200 and "xtl report of two runs" in body
    for bad in ("report/2", "report/-1", "report/..%2F..%2Fcnn%2Fconfig.yaml", "report/0%2F..%2F..%2Fcnn%2Fconfig.yaml"):
        status, body = get(server + bad)
        assert status in (404, 422) and "format_version" not in body, bad

    # an API call whose "upload" is a path on the server (here a real image) is refused
    image = tmp_path / "server_side.jpg"
    shutil.copy(cifar_image(cifar, "cat"), image)
    for path in (config, image):
        events = api_call(server, "explain_upload", [{"path": str(path), "meta": {"_type": "gradio.FileData"}},
                                                     ["gradcam"], "predicted", 0.5])
        assert "event: error" in events and "Explained" not in events and "format_version" not in events


def test_the_server_refuses_an_oversized_upload_sent_around_the_page(server):
    import httpx

    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.jpg", os.urandom(MB + 1000))}, timeout=30)
    assert response.status_code == 413


def api_call(server: str, api_name: str, data: list) -> str:
    """The event stream of one call through Gradio's HTTP API."""
    request = urllib.request.Request(f"{server}gradio_api/call/{api_name}", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"data": data}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        event = json.loads(response.read())["event_id"]
    return get(f"{server}gradio_api/call/{api_name}/{event}")[1]


def test_a_request_costs_one_explanation_per_offered_method_and_the_queue_is_bounded(runs, monkeypatch):
    """Issue 28 probe: every option a client sends is checked by Gradio (an opacity outside [0, 1], a
    class or method not offered, a test image that does not exist: an error event), but a method
    repeated in one request (`["saliency"] * 500`) was explained 500 times. Each offered method is
    explained once per run, methods not offered never, and at most `MAX_QUEUE` requests wait."""
    import xtl.app.explorer as explorer_module
    from xtl.app import make_app
    from xtl.app.explorer import Explorer
    from xtl.app.ui import MAX_QUEUE

    explorer = Explorer(runs, ["saliency", "gradcam"], "cpu")
    calls, real = [], explorer_module.explain
    monkeypatch.setattr(explorer_module, "explain", lambda *a, **k: (calls.append(k["method"]), real(*a, **k))[1])
    answer = explorer.answer(runs[0].load_split()["test"].images[0], ["saliency"] * 50 + ["lrp_epsilon", "gradcam"])
    assert sorted(calls) == ["gradcam", "gradcam", "saliency", "saliency"]  # two runs, each method once
    assert [list(m.maps) for m in answer.models] == [["saliency", "gradcam"]] * 2
    app = make_app(runs, ["saliency"], device="cpu")
    queues = [route.app.get_blocks()._queue for route in app.routes if hasattr(getattr(route, "app", None), "get_blocks")]
    assert [q.max_size for q in queues] == [MAX_QUEUE]


def test_one_client_holds_only_a_few_places_in_the_queue(runs):
    """Issue 28 probe: Gradio bounds its queue as a whole, so one client that sent `MAX_QUEUE` slow
    requests filled it and every other client got "queue is full". A client may now hold
    `MAX_PER_CLIENT` places; its next join is refused (503, naming the reason), another client's is
    taken. The app's real join route, no processing loop: joined requests stay in the queue."""
    import asyncio

    import httpx

    from xtl.app import make_app
    from xtl.app.guard import MAX_PER_CLIENT
    from xtl.app.ui import MAX_QUEUE

    assert 1 < MAX_PER_CLIENT < MAX_QUEUE
    app = make_app(runs, ["saliency"], device="cpu")
    blocks = next(r.app.get_blocks() for r in app.routes if hasattr(getattr(r, "app", None), "get_blocks"))
    fn_index = next(i for i, fn in blocks.fns.items() if fn.api_name == "explain_test_image")

    async def join(host: str, n: int) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=(host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return [await client.post("/gradio_api/queue/join",
                                      json={"data": ["0:0", ["saliency"], "predicted", 0.5], "fn_index": fn_index,
                                            "session_hash": f"{host}-{k}"}) for k in range(n)]

    async def both():
        flood = await join("10.0.0.1", MAX_PER_CLIENT + 2)
        other = await join("10.0.0.2", 1)
        return flood, other

    flood, other = asyncio.run(both())
    assert [r.status_code for r in flood] == [200] * MAX_PER_CLIENT + [503, 503]
    assert f"already has {MAX_PER_CLIENT} requests waiting or running" in flood[-1].json()["detail"]
    assert [r.status_code for r in other] == [200]
    assert len(blocks._queue) == MAX_PER_CLIENT + 1
