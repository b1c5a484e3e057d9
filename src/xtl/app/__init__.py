"""`xtl serve`: a local web app over the fine-tuned models of the runs named on the command line.

    serve([RunDir("runs/quick-efficientnet_lite0"), RunDir("runs/quick-vit_s14_dinov2")])

Nothing in a request names a file on the server: images come as uploads (checked by
`uploads.read_upload`) or as a position in a served run's test split, and a run's HTML report
is served by the run's index (`/report/<index>`).
"""

from __future__ import annotations

import os
import sys

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

    # Gradio refuses larger files before they are sent (a message in the page) and on the server.
    page = build(explorer, limits)
    app = gr.mount_gradio_app(app, page, path="/", max_file_size=limits.max_bytes, ssr_mode=False,
                              footer_links=[], css=CSS, mcp_server=False)
    # Unlike launch(), mount_gradio_app leaves this False, which switches off Gradio's check that a
    # file named in a request was uploaded (processing_utils._check_allowed): any path would be read.
    page.has_launched = True
    return app


def serve(runs: list[RunDir], methods: list[str] | None = None, host: str = "127.0.0.1", port: int = 7860,
          max_upload_mb: float = 10.0, max_pixels: int = 25_000_000, device: str | None = None) -> None:
    """Serve the app until interrupted."""
    import uvicorn

    app = make_app(runs, methods, max_upload_mb, max_pixels, device)
    print(f"xtl explorer: http://{host}:{port}/ (Ctrl+C stops it)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
