"""`xtl serve`: a local web app over the fine-tuned models of the runs named on the command line.

    serve([RunDir("runs/quick-efficientnet_lite0"), RunDir("runs/quick-vit_s14_dinov2")])

Nothing in a request names a file on the server: images come as uploads (checked by
`uploads.read_upload`) or as a position in a served run's test split, and a run's HTML report
is served by the run's index (`/report/<index>`).
"""

from __future__ import annotations

import errno
import os
import sys

from xtl.errors import XtlError
from xtl.runs import RunDir

__all__ = ["make_app", "serve"]


def make_app(runs: list[RunDir], methods: list[str] | None = None, max_upload_mb: float = 10.0,
             max_pixels: int = 25_000_000, device: str | None = None):
    """The FastAPI app: the Gradio page at `/` and the runs' reports at `/report/<index>`."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    from xtl.app.explorer import Explorer
    from xtl.app.guard import BodyLimit, limit_each_client
    from xtl.app.ui import CSS, build
    from xtl.app.uploads import UploadLimits

    limits = UploadLimits.from_mb(max_upload_mb, max_pixels)
    explorer = Explorer(runs, methods, device)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/report/{index}")
    def report(index: int) -> FileResponse:
        if not 0 <= index < len(explorer.runs) or not explorer.runs[index].report.is_file():
            raise HTTPException(status_code=404, detail="no report for this run")
        return FileResponse(explorer.runs[index].report, media_type="text/html")

    # No OpenAPI schema and no docs page: neither FastAPI's (off above and in Gradio's app below) nor
    # Gradio's own schema, answered 404 here before the request reaches the page mounted at `/`.
    # `/gradio_api/info` stays: gradio_client reads it to call the named events (explain_upload ...).
    def no_schema() -> None:
        raise HTTPException(status_code=404, detail="Not Found")

    for schema in ("/gradio_api/openapi.json", "/gradio_api/docs", "/gradio_api/redoc"):
        app.add_api_route(schema, no_schema, methods=["GET", "HEAD", "POST"], include_in_schema=False)

    # Gradio refuses larger files before they are sent (a message in the page) and on the server.
    page = build(explorer, limits)
    app = gr.mount_gradio_app(app, page, path="/", max_file_size=limits.max_bytes, ssr_mode=False,
                              footer_links=[], css=CSS, mcp_server=False,
                              app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None})
    # Unlike launch(), mount_gradio_app leaves this False, which switches off Gradio's check that a
    # file named in a request was uploaded (processing_utils._check_allowed): any path would be read.
    page.has_launched = True
    # Gradio bounds its queue as a whole: one client may hold only a few of its places.
    limit_each_client(page._queue)
    # Gradio bounds the files of an upload, not the body of any other request (an API call's JSON).
    app.add_middleware(BodyLimit, max_upload_bytes=limits.max_bytes)
    return app


def serve(runs: list[RunDir], methods: list[str] | None = None, host: str = "127.0.0.1", port: int = 7860,
          max_upload_mb: float = 10.0, max_pixels: int = 25_000_000, device: str | None = None) -> None:
    """Serve the app until interrupted. An address that cannot be listened on (a port in use, a host
    name that does not resolve or is not this machine's) is an `XtlError`, before the models load."""
    import uvicorn

    sock = listen_socket(host, port)
    try:
        app = make_app(runs, methods, max_upload_mb, max_pixels, device)
        url_host = f"[{host}]" if ":" in host else host
        print(f"xtl explorer: http://{url_host}:{sock.getsockname()[1]}/ (Ctrl+C stops it)", file=sys.stderr, flush=True)
        # uvicorn.run would bind the address itself and exit with status 3 when it cannot
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
    finally:
        sock.close()


def listen_socket(host: str, port: int):
    """A TCP socket bound to `host`:`port` (as uvicorn binds it), or an `XtlError` naming the option."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        reason = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            raise XtlError(f"option --port {port}: {host}:{port} is already in use; choose another --port") from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise XtlError(f"option --port {port}: {reason} (ports below 1024 need root); choose another --port") from None
        raise XtlError(f"option --host {host}: cannot listen there ({reason}); give this machine's name or "
                       "address (127.0.0.1: this machine only, 0.0.0.0: every network)") from None
    sock.set_inheritable(True)
    return sock
