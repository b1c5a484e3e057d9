"""Issue 15, security and messages: YAML alias bombs and oversized settings files, the web app's request
bodies and API schema, and user text (paths with square brackets) printed literally."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from xtl.errors import XtlError
from xtl.io import MAX_YAML_BYTES, read_yaml, write_yaml
from xtl.pipeline.config import dump, load_config, parse_assignments
from helpers import XTL


def _xtl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([XTL, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# A "billion laughs": nine levels of ten aliases each, 10**9 strings once expanded, in a few hundred bytes.
BOMB_LEVELS = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"{b}: &{b} [{', '.join(['*' + a] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi")
]


def _bomb(path: Path, under: str = "train.extra") -> Path:
    """The bomb inside a mapping whose keys xtl does not check (`train: {extra: ...}`, a model of `per_model`)."""
    outer, inner = under.split(".")
    path.write_text(f"name: tiny\n{outer}:\n  {inner}:\n" + "".join(f"    {line}\n" for line in BOMB_LEVELS))
    return path


@pytest.mark.parametrize("under", ["train.extra", "per_model.timm:resnet10t", "title.x"])
def test_a_yaml_alias_bomb_in_a_free_form_mapping_is_refused_before_anything_is_built(tmp_path, under):
    path = _bomb(tmp_path / "bomb.yaml", under)
    with pytest.raises(XtlError) as err:
        load_config(path)
    assert str(err.value) == f"{path} uses YAML aliases (&/*), which xtl does not accept; write the values out"


def test_every_yaml_xtl_reads_refuses_aliases(tmp_path):
    """`read_yaml` reads config.yaml, pipeline.yaml and `xtl run -c`: a single alias is refused, anchors alone pass."""
    path = tmp_path / "config.yaml"
    path.write_text("format_version: 1\nrun: &r {lr: 0.1}\nderived: *r\n")
    with pytest.raises(XtlError, match=r"config.yaml uses YAML aliases \(&/\*\), which xtl does not accept"):
        read_yaml(path)
    path.write_text("run: &r {lr: 1e-4}\n")
    assert read_yaml(path) == {"run": {"lr": 1e-4}}


def test_a_command_line_value_with_an_alias_is_refused_naming_the_option():
    with pytest.raises(XtlError, match=r"^option --train uses YAML aliases"):
        parse_assignments(["x=[&a [1, 2], *a]"], "--train")
    assert parse_assignments(["lr=1e-4", "m.epochs=2"], "--train") == {"lr": 1e-4, "m": {"epochs": 2}}


def test_xtl_run_with_an_alias_bomb_is_one_line_and_starts_nothing(tmp_path):
    path = _bomb(tmp_path / "bomb.yaml")
    result = _xtl("run", "-c", str(path), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert _one_line_error(result) == f"error: {path} uses YAML aliases (&/*), which xtl does not accept; write the values out"
    assert not (tmp_path / "runs").exists()


def test_an_oversized_or_too_deeply_nested_yaml_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("notes: '" + "x" * MAX_YAML_BYTES + "'\n")
    with pytest.raises(XtlError) as err:
        load_config(big)
    assert str(err.value) == f"{big} is larger than 4 MB, too large for a settings file"
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(XtlError) as err:
        load_config(deep)
    assert str(err.value) == f"{deep} nests too deeply to be a settings file"


def test_a_normal_config_still_loads_and_what_xtl_writes_has_no_alias(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: tiny\nmodels: [timm:resnet10t]\ntrain: {lr: 1e-3, epochs: 2}\n"
                    "per_model: {timm:resnet10t: {lr: 3e-4}}\n")
    config = load_config(path)
    assert config.name == "tiny" and config.train["lr"] == 1e-3 and config.per_model["timm:resnet10t"] == {"lr": 3e-4}
    # A value shared by two keys is written out twice, not as &id001 / *id001, so xtl reads its own files.
    shared = [1, 2]
    write_yaml(tmp_path / "shared.yaml", {"a": shared, "b": shared})
    assert "*" not in (tmp_path / "shared.yaml").read_text()
    assert read_yaml(tmp_path / "shared.yaml") == {"a": [1, 2], "b": [1, 2]}
    config.explain_methods = config.train["methods"] = ["gradcam"]
    assert "*" not in dump(config) and yaml.safe_load(dump(config))["explain_methods"] == ["gradcam"]


# ----------------------------------------------------------------------------- xtl serve: bodies, schema, exit status


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, cifar):
    from helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("served") / "cnn", cifar, "timm:resnet10t", 32)


@pytest.fixture(scope="module")
def app(served_run):
    from xtl.app import make_app

    return make_app([served_run], max_upload_mb=1)


def _asgi_post(app, path: str, headers: dict[str, str], chunks) -> tuple[int, bytes, int]:
    """One POST straight into the ASGI app: (status, body, request chunks the app pulled from `chunks`)."""
    import asyncio

    pulled = 0
    answer: dict = {"body": b""}

    async def receive():
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7860)}
    asyncio.run(app(scope, receive, send))
    return answer["status"], answer["body"], pulled


def _stream(size: int = 64 * 1024, count: int = 160):
    """A 10 MB body in 64 KB chunks (finite, so that a server without the bound reads it all, not forever)."""
    for _ in range(count):
        yield b" " * size


def test_an_oversized_json_body_is_refused_before_it_is_read(app):
    """200 MB announced: 413 and not one chunk read; a 10 MB body streamed without a length (chunked):
    413 once a little over 1 MB has arrived (the rest is never read)."""
    from xtl.app.guard import MAX_OTHER_BODY

    json_type = {"content-type": "application/json"}
    status, body, pulled = _asgi_post(app, "/gradio_api/call/explain_upload",
                                      {**json_type, "content-length": str(200 * 2**20)}, _stream())
    assert (status, pulled) == (413, 0) and b"request body too large: the limit is 1 MB" in body
    status, body, pulled = _asgi_post(app, "/gradio_api/queue/join", json_type, _stream())
    assert status == 413 and pulled == MAX_OTHER_BODY // (64 * 1024) + 1
    # a multipart body's bound is the upload limit (1 MB here) plus room for the multipart headers
    status, _, pulled = _asgi_post(app, "/gradio_api/queue/join", {"content-type": "multipart/form-data; boundary=x"},
                                   _stream())
    assert status == 413 and pulled == (2**20 + 64 * 1024) // (64 * 1024) + 1


def test_api_schemas_are_not_served_and_normal_requests_still_work(app, cifar):
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        for route in ("/openapi.json", "/docs", "/redoc", "/gradio_api/openapi.json", "/gradio_api/docs"):
            assert client.get(route).status_code == 404, route
        # what gradio_client reads to call the named events stays, and names only those
        info = client.get("/gradio_api/info?all_endpoints=true")
        assert info.status_code == 200
        assert sorted(info.json()["named_endpoints"]) == ["/explain_test_image", "/explain_upload"]
        # a JSON body over the bound, sent whole
        big = client.post("/gradio_api/call/explain_upload", content=b'{"data": ["' + b"x" * (3 * 2**20) + b'"]}',
                          headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json() == {"detail": "request body too large: the limit is 1 MB"}
        # an upload under the limit and an API call are answered as before
        with open(cifar / "test" / "cat" / "0000.jpg", "rb") as f:
            uploaded = client.post("/gradio_api/upload", files={"files": ("cat.jpg", f)})
        assert uploaded.status_code == 200 and uploaded.json()[0].endswith("cat.jpg")
        call = client.post("/gradio_api/call/explain_upload",
                           json={"data": [{"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}},
                                          ["gradcam"], "predicted", 0.5]})
        assert call.status_code == 200 and "event_id" in call.json()
        assert client.get("/").status_code == 200


def test_xtl_serve_on_an_address_it_cannot_use_exits_2_in_one_line(served_run, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _xtl("serve", str(served_run.path), "--port", str(port))
    assert _one_line_error(result) == f"error: option --port {port}: 127.0.0.1:{port} is already in use; choose another --port"
    result = _xtl("serve", str(served_run.path), "--host", "no-such-host.invalid")
    assert _one_line_error(result).startswith("error: option --host no-such-host.invalid: cannot listen there (")


# ----------------------------------------------------------------------------- user text printed literally

BRACKETED = ["runs/[x]", "runs/[/x]", "a[bold]b[/bold]", "photo[1].jpg", "[red]", r"back\[x]"]


@pytest.mark.parametrize("message", [f"file {name} is broken" for name in BRACKETED] + ["[bold] [/x] [1] [/]"])
def test_the_error_printer_prints_an_error_literally(monkeypatch, capsys, message):
    import xtl.cli

    def fails() -> None:
        raise XtlError(message)

    monkeypatch.setattr(xtl.cli, "app", fails)
    with pytest.raises(SystemExit) as exit_:
        xtl.cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("name", BRACKETED[:4])
def test_a_missing_run_folder_with_brackets_is_named_whole(monkeypatch, capsys, tmp_path, name):
    import xtl.cli
    from xtl.runs import RunDir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(XtlError) as expected:
        RunDir(Path(name)).read()
    assert name in str(expected.value)
    monkeypatch.setattr("sys.argv", ["xtl", "evaluate", name])
    with pytest.raises(SystemExit) as exit_:
        xtl.cli.main()
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {expected.value}\n"


def test_xtl_evaluate_on_a_folder_named_with_a_closing_tag_is_one_line(tmp_path):
    """In a real process: `[/x]` used to crash the error printer (rich's MarkupError traceback, exit 1)."""
    result = _xtl("evaluate", "runs/[/x]", cwd=tmp_path)
    assert _one_line_error(result) == "error: run directory runs/[/x] has no config.yaml (not an xtl run)"


def test_class_names_and_paths_with_brackets_are_printed_whole(tmp_path, cifar):
    """`xtl data`'s table (class folders `b[x]d`, `[bold]`) and its success line (a figure path with brackets)."""
    import shutil

    for part in ("train", "test"):
        for name in ("cat", "b[x]d", "[bold]"):
            folder = tmp_path / "data" / part / name
            folder.mkdir(parents=True)
            for image in sorted((cifar / part / "cat").iterdir())[:4]:
                shutil.copy(image, folder / image.name)
    figure = "figs[x]/dist[1].png"
    result = _xtl("data", "--source", "data", "--split", "random", "--train-size", "6", "--val-size", "3",
                  "--test-size", "6", "--figure", figure, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"class distribution: {figure}" in result.stdout.splitlines()
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == ["[bold]", "b[x]d", "cat", "total"]
    assert (tmp_path / figure).is_file()


def test_progress_bars_show_run_names_whole(monkeypatch):
    """The faithfulness and explanation bars' descriptions hold run names: `a[x]` shown whole, `[/x]` no crash."""
    import io

    from rich.console import Console

    import xtl.faithfulness.perturbation as perturbation
    from xtl.explain.runner import progress_bar

    for make in (perturbation.make_progress, progress_bar):
        out = Console(file=io.StringIO(), width=200, color_system=None)
        monkeypatch.setattr(perturbation, "console", out)
        bar = make() if make is perturbation.make_progress else make(True, out)
        bar.add_task("runs/a[x]b [/x]: gradcam", total=3)
        out.print(bar.get_renderable())
        assert "runs/a[x]b [/x]: gradcam" in out.file.getvalue()
