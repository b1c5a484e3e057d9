"""The Gradio page: pick or upload an image, every model's top-5 and heatmaps side by side."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from xtl.app.explorer import PREDICTED, Answer, Explorer, display_image, overlays
from xtl.app.uploads import FORMAT_LIST, MB, UploadLimits, UploadRefused, read_upload
from xtl.explain.gallery import gallery_files

MAX_PICKS_PER_RUN = 500  # test images offered per run in the picker (the quick demo's whole test split)
CSS = """
#status p { font-size: 1.05em; }
.refused { color: #b91c1c; font-weight: 600; }
"""


# Requests waiting for the models. Each costs at most one explanation per offered method and run
# (`Explorer.answer`), so the wait of a request is bounded by MAX_QUEUE of those.
MAX_QUEUE = 16


def report_url(index: int) -> str:
    return f"report/{index}"


def metrics_table(explorer: Explorer) -> str:
    """Headline metrics of every run, read again on each page load (a report may appear later)."""
    lines = ["| run | model | test accuracy [95 % CI] | ROC-AUC (macro OvR) | report |", "|---|---|---|---|---|"]
    for k, run in enumerate(explorer.runs):
        m = run.metrics()
        accuracy = f"{m['accuracy']:.3f} [{m['accuracy_ci95'][0]:.3f}, {m['accuracy_ci95'][1]:.3f}]" if m else "-"
        auc = f"{m['roc_auc_macro_ovr']:.3f}" if m.get("roc_auc_macro_ovr") is not None else "-"
        report = f"[HTML report]({report_url(k)})" if run.report.is_file() else "none yet"
        lines.append(f"| {run.name} | {run.loaded.spec.name} | {accuracy} | {auc} | {report} |")
    return "\n".join(lines)


def pick_choices(explorer: Explorer) -> list[tuple[str, str]]:
    """(label, "run:position") for each run's misclassified gallery, then its test images."""
    choices = []
    for r, run in enumerate(explorer.runs):
        part, names = run.loaded.part, run.class_names
        predicted = run.loaded.probabilities.argmax(1)
        for pos in run.misclassified():
            label = f"{run.name}: misclassified #{pos}, {names[int(part.labels[pos])]} taken for {names[int(predicted[pos])]}"
            choices.append((label, f"{r}:{pos}"))
        for pos in range(min(len(part), MAX_PICKS_PER_RUN)):
            choices.append((f"{run.name}: test #{pos}, {names[int(part.labels[pos])]}", f"{r}:{pos}"))
    return choices


def picked_image(explorer: Explorer, value: str):
    try:
        run, pos = (int(v) for v in value.split(":"))
    except ValueError:
        raise UploadRefused("no such test image") from None
    if not (0 <= run < len(explorer.runs) and 0 <= pos < len(explorer.runs[run].loaded.part)):
        raise UploadRefused("no such test image")
    return explorer.runs[run].loaded.part.images[pos]


def build(explorer: Explorer, limits: UploadLimits) -> gr.Blocks:
    n = len(explorer.runs)
    with gr.Blocks(title="xtl explorer", delete_cache=(600, 600)) as page:
        gr.Markdown("# xtl explorer\nEvery model's top-5 probabilities and heatmaps for one image, side by side.")
        table = gr.Markdown(metrics_table(explorer), elem_id="metrics")
        answer_state = gr.State(None)
        image_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                upload = gr.UploadButton("Upload an image", type="filepath", variant="primary", elem_id="upload")
                gr.Markdown(f"{FORMAT_LIST}; at most {limits.max_bytes / MB:g} MB and "
                            f"{limits.max_pixels / 1e6:g} megapixels.")
                pick = gr.Dropdown(pick_choices(explorer), value=None, label="or pick a test image", elem_id="pick")
                methods = gr.CheckboxGroup(explorer.methods, value=explorer.methods, label="methods", elem_id="methods")
                target = gr.Dropdown([PREDICTED] + explorer.class_names, value=PREDICTED, label="class explained",
                                     elem_id="target")
                alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="heatmap opacity", elem_id="opacity")
                status = gr.Markdown("Upload an image or pick one.", elem_id="status")
                shown = gr.Image(label="input", interactive=False, buttons=[], elem_id="input-image")
            with gr.Column(scale=3):
                with gr.Row():
                    panels = [_model_panel(k, run.title) for k, run in enumerate(explorer.runs)]
        with gr.Accordion("misclassified galleries", open=False):
            for run in explorer.runs:
                drawn = gallery_files(run.run.figures, "misclassified")  # newest first
                figure = drawn[0] if drawn else None
                if figure is not None:
                    gr.Image(str(figure), label=run.title, interactive=False)
                else:
                    gr.Markdown(f"{run.title}: no gallery yet (`xtl explain {run.run.path}` draws it).")

        outputs = [answer_state, image_state, status, shown] + [c for p in panels for c in p]
        answer_outputs = [answer_state] + [c for p in panels for c in p]
        galleries = [p[2] for p in panels]

        def show(image, chosen, target_class, opacity, message: str) -> list[Any]:
            answer = explorer.answer(image, list(chosen or []), target_class)
            return [answer, image, message, display_image(image)] + _panel_values(answer, opacity)

        def refused(err: UploadRefused) -> list[Any]:
            """Clears the previous answer; the reason names the browser's file name, escaped."""
            message = f'<span class="refused">Upload refused: {html.escape(str(err))}</span>'
            return [None, None, message, None] + [None, "", []] * n

        def on_upload(path: str | None, chosen, target_class, opacity):
            if not path:
                return [gr.skip()] * len(outputs)
            try:
                image = read_upload(path, limits)
            except UploadRefused as err:
                return refused(err)
            return show(image, chosen, target_class, opacity, html.escape(f"Explained {Path(path).name}."))

        def on_pick(value: str | None, chosen, target_class, opacity):
            if not value:
                return [gr.skip()] * len(outputs)
            try:
                image = picked_image(explorer, value)
            except UploadRefused as err:
                return refused(err)
            return show(image, chosen, target_class, opacity, "Explained the picked test image.")

        def on_options(image, chosen, target_class, opacity):
            if image is None:
                return [gr.skip()] * len(answer_outputs)
            answer = explorer.answer(image, list(chosen or []), target_class)
            return [answer] + _panel_values(answer, opacity)

        def on_opacity(answer: Answer | None, opacity):
            if answer is None:
                return [gr.skip()] * n
            return [overlays(answer, k, opacity) for k in range(n)]

        controls = [methods, target, alpha]
        # One queue for every event that runs a model: requests are answered one after another.
        upload.upload(on_upload, [upload] + controls, outputs, api_name="explain_upload", concurrency_id="models")
        pick.input(on_pick, [pick] + controls, outputs, api_name="explain_test_image", concurrency_id="models")
        for control in (methods, target):
            control.input(on_options, [image_state] + controls, answer_outputs, api_visibility="private",
                          concurrency_id="models")
        alpha.change(on_opacity, [answer_state, alpha], galleries, api_visibility="private", trigger_mode="always_last",
                     show_progress="hidden")
        page.load(lambda: metrics_table(explorer), None, table, api_visibility="private")
    # at most MAX_QUEUE requests wait (one runs at a time); more are refused with Gradio's "queue is full"
    page.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)
    return page


def _model_panel(k: int, title: str) -> tuple[gr.Label, gr.Markdown, gr.Gallery]:
    with gr.Column(min_width=260, elem_id=f"model-{k}"):
        gr.Markdown(f"### {title}")
        label = gr.Label(num_top_classes=5, label="top-5 probabilities", elem_id=f"model-{k}-top5")
        caption = gr.Markdown("", elem_id=f"model-{k}-caption")
        gallery = gr.Gallery(label="heatmaps", columns=2, height="auto", object_fit="contain", allow_preview=False,
                             elem_id=f"model-{k}-maps")
    return label, caption, gallery


def _panel_values(answer: Answer, opacity: float) -> list[Any]:
    values = []
    for k, model in enumerate(answer.models):
        caption = f"heatmaps of class **{model.target}**" + (f" ({model.note})" if model.note else "")
        if not model.maps:
            caption += "; no chosen method applies to this model"
        values += [model.probabilities, caption, overlays(answer, k, opacity)]
    return values
