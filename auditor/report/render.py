"""Render a :class:`~auditor.report.build.ReportView` to HTML and PDF.

The HTML is self-contained (inline CSS and SVG, no external resources) and
every value from the results is autoescaped; only the chart SVG, produced by
our own code, is trusted markup. The PDF is rendered from the same HTML with
WeasyPrint, which is not allowed to fetch anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

import jinja2

from ..resources import templates_dir
from .build import ReportView, build_view

HTML_NAME = "report.html"
PDF_NAME = "report.pdf"


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_html(view: ReportView) -> str:
    """Render the report view to a self-contained HTML document."""
    return _environment().get_template("report.html.j2").render(view=view)


def write_report(results: dict, out_dir: Path, source: str = "input") -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.pdf`` for a results dict into ``out_dir``.

    Returns the two paths. Bad results raise :class:`~auditor.errors.AuditError`
    before anything is written (``source`` names them in the message), and
    ``out_dir`` is created only then. Both files are written in a temporary
    directory inside ``out_dir`` and renamed at the end; if writing fails, the
    temporary directory is deleted, neither ``report.html`` nor ``report.pdf``
    is left in ``out_dir`` (not even from an earlier run, which would no longer
    match), the folders this call created are removed again, and the error
    propagates.
    """
    html = render_html(build_view(results, source=source))
    out_dir = Path(out_dir)
    html_path, pdf_path = out_dir / HTML_NAME, out_dir / PDF_NAME
    created = _missing_folders(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".report-") as temp:
            html_temp, pdf_temp = Path(temp) / HTML_NAME, Path(temp) / PDF_NAME
            html_temp.write_text(html, encoding="utf-8")
            write_pdf(html, pdf_temp)
            os.replace(html_temp, html_path)
            os.replace(pdf_temp, pdf_path)
    except BaseException:
        # best effort: the error that got us here is the one to report
        with contextlib.suppress(OSError):
            html_path.unlink(missing_ok=True)
            pdf_path.unlink(missing_ok=True)
            for folder in created:  # deepest first; not empty only if someone else wrote there
                folder.rmdir()
        raise
    return html_path, pdf_path


def write_pdf(html: str, path: Path) -> None:
    """Render ``html`` to a PDF at ``path`` without loading anything it refers to:
    WeasyPrint skips, with a logged warning, every URL (no protocol is allowed),
    so that the report touches neither the network nor the disk.

    WeasyPrint logs, rather than raises, what it cannot draw (an image, an
    SVG chart): any such ERROR fails the write, since a report with a piece
    missing must not pass for a whole one.
    """
    # imported here, not with this module: importing WeasyPrint makes Pillow
    # load truncated images for the whole process, so the setting is put back
    from PIL import ImageFile

    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    import weasyprint

    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    refuse_all = weasyprint.urls.URLFetcher(allowed_protocols=())
    failures = _Failures()
    logger = logging.getLogger("weasyprint")
    logger.addHandler(failures)
    try:
        with _signals_held():
            weasyprint.HTML(string=html, url_fetcher=refuse_all).write_pdf(path)
    finally:
        logger.removeHandler(failures)
    if failures.messages:
        Path(path).unlink(missing_ok=True)
        raise RuntimeError(f"WeasyPrint could not render the report: {failures.messages[0]}")


class _Failures(logging.Handler):
    """Collects the messages of ERROR records."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _signals_held(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them to the
    handlers there were before. WeasyPrint catches ``BaseException`` while
    drawing an SVG: an interrupt there was swallowed (the chart left out) and
    the scan finished as if nothing had happened. Only the main thread can
    set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing
