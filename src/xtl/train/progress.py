"""A rich progress bar for fine-tuning: loss, accuracy and images/s of the running epoch."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} {task.fields[ips]:.1f} img/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, n_batches: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(f"epoch {epoch}/{epochs}", total=n_batches, loss=0.0, acc=0.0, ips=0.0)

    def advance(self, loss: float, acc: float, images_per_s: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, loss=loss, acc=acc, ips=images_per_s)
