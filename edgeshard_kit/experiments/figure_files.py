"""Figure files: HTML that shares one plotly.js per results folder (or carries it inline on request), and the
PNG / SVG / PDF copies that plotly's static export (kaleido, driving an installed Chrome/Chromium) writes beside it.

HTML by default references ``plotly-<version>.min.js`` in the results root (one 4.8 MB copy for all runs
there) by a relative path, so a run folder copied together with that file, or the whole results folder, opens
offline. A figure file that must open on its own, offline (mailed, attached to a paper's artefact) is written
with ``standalone=True`` or made so afterwards by ``make_standalone`` (``edgeshard results standalone RUN``):
plotly.js inline, about 4.8 MB per file. The PNG/SVG/PDF copies open anywhere.

Static export needs the ``kaleido`` package and a Chrome or Chromium: ``$BROWSER_PATH`` when set, else the first
of chromium, chromium-browser, google-chrome(-stable), chrome on PATH (Debian: ``apt-get install chromium``).
``$EDGESHARD_FIGURE_FORMATS`` chooses the formats (default ``png,svg,pdf``; ``none`` switches export off).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError

FORMATS = ("png", "svg", "pdf")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
EXPORT_WIDTH, EXPORT_HEIGHT, PNG_SCALE = 900, 500, 2  # layout px when the figure sets none; PNG at 2x for print
_SRC_RE = re.compile(r'<script[^>]*\ssrc="([^"]*plotly[^"]*\.js)"[^>]*></script>')


def plotlyjs_name() -> str:
    """The file name of the shared plotly.js, versioned so figures of an older plotly keep theirs."""
    from plotly.offline import get_plotlyjs_version
    return f"plotly-{get_plotlyjs_version()}.min.js"


def shared_plotlyjs(folder: str | Path) -> Path:
    """`folder`/plotly-<version>.min.js, written once (from the installed plotly package) when absent."""
    from plotly.offline import get_plotlyjs
    path = Path(folder) / plotlyjs_name()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(get_plotlyjs(), encoding="utf-8")
        tmp.replace(path)  # atomic: two runs starting together both see a whole file
    return path


def _missing_js_note(src: str, name: str) -> str:
    # shown instead of a blank page when the shared plotly.js is not beside the figure
    msg = (f"This figure needs {src} (the results folder's shared copy of plotly.js), which is not there. "
           f"Copy it along, open {name}.svg / .png / .pdf beside this file, or make the file self-contained: "
           f"edgeshard results standalone RUN.")
    return ('<script>if (typeof Plotly === "undefined") {document.body.insertAdjacentHTML("afterbegin", '
            f'"<p style=\\"font:16px sans-serif;color:#a00\\">{msg}</p>");}}</script>')


def write_html(fig: Any, path: str | Path, standalone: bool = False, js_dir: str | Path | None = None) -> Path:
    """Write `fig` as a full HTML page at `path` (.html added when missing).

    standalone: plotly.js inline (opens alone, offline; ~4.8 MB). Otherwise the page loads the shared
    plotly.js in `js_dir` (default: the figure's folder) by a relative path; without it the page says so.
    """
    path = Path(path)
    if path.suffix != ".html":
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    if standalone:
        fig.write_html(path, include_plotlyjs=True, full_html=True)
        return path
    js = shared_plotlyjs(js_dir or path.parent)
    src = Path(os.path.relpath(js, path.parent)).as_posix()
    html = fig.to_html(include_plotlyjs=src, full_html=True)
    html = html.replace("</body>", _missing_js_note(src, path.stem) + "\n</body>", 1)
    path.write_text(html, encoding="utf-8")
    return path


def make_standalone(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite an HTML figure (in place, or to `out`) with plotly.js inline, so it opens alone and offline.

    The referenced plotly.js is used when it is there, else the installed plotly's. KitError when `path` is
    not an HTML figure of the kit.
    """
    from plotly.offline import get_plotlyjs
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: no such figure file")
    html = path.read_text(encoding="utf-8")
    m = _SRC_RE.search(html)
    if m is None:
        if "Plotly.newPlot" in html:  # already self-contained
            if out:
                shutil.copyfile(path, out)
            return Path(out or path)
        raise KitError(f"{path}: not a plotly figure (no plotly.js reference)")
    ref = (path.parent / m.group(1))
    js = ref.read_text(encoding="utf-8") if ref.is_file() else get_plotlyjs()
    html = html[:m.start()] + f'<script type="text/javascript">{js}</script>' + html[m.end():]
    html = re.sub(r'<script>if \(typeof Plotly === "undefined"\).*?</script>\n?', "", html, count=1, flags=re.S)
    dest = Path(out or path)
    dest.write_text(html, encoding="utf-8")
    return dest


def export_formats() -> tuple[str, ...]:
    """The static formats to write: $EDGESHARD_FIGURE_FORMATS (comma-separated; none/off/0: none), else FORMATS."""
    raw = os.environ.get("EDGESHARD_FIGURE_FORMATS")
    if raw is None:
        return FORMATS
    if raw.strip().lower() in ("", "none", "off", "0", "no"):
        return ()
    fmts = tuple(f.strip().lower().lstrip(".") for f in raw.split(",") if f.strip())
    bad = [f for f in fmts if f not in ("png", "svg", "pdf", "jpeg", "jpg", "webp")]
    if bad:
        raise KitError(f"EDGESHARD_FIGURE_FORMATS: {', '.join(bad)} is not one of png, svg, pdf, jpeg, webp")
    return fmts


def find_browser() -> tuple[str | None, str]:
    """(path of the Chrome/Chromium kaleido will drive, "") or (None, why there is none)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None, "the kaleido package is not installed (pip install kaleido)"
    env = os.environ.get("BROWSER_PATH")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env, ""
        return None, f"BROWSER_PATH={env} is not an executable file"
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found, ""
    return None, ("no Chrome/Chromium found (install Debian's chromium: apt-get install chromium, "
                  "or set BROWSER_PATH)")


def export_static(items: list[tuple[Any, Path]], formats: tuple[str, ...] | None = None,
                  timeout_s: float = 120.0) -> tuple[list[Path], str]:
    """Write every (figure, html path) also as <stem>.png / .svg / .pdf beside it, with one browser for all.

    Returns (the files written, "") or ([], the one-line reason nothing was written: no kaleido, no browser,
    export switched off, or the export's error). Never raises for a missing browser: HTML is what a run needs.
    """
    formats = export_formats() if formats is None else formats
    if not items or not formats:
        return [], "" if items else "no figures"
    browser, why = find_browser()
    if browser is None:
        return [], why
    import kaleido
    specs, paths = [], []
    for fig, html in items:
        d = fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else dict(fig)
        lay = d.get("layout", {})
        for fmt in formats:
            p = Path(html).with_suffix("." + fmt)
            specs.append({"fig": d, "path": p, "opts": {
                "format": fmt, "width": lay.get("width") or EXPORT_WIDTH,
                "height": lay.get("height") or EXPORT_HEIGHT, "scale": PNG_SCALE if fmt == "png" else 1}})
            paths.append(p)
    try:
        kaleido.write_fig_from_object_sync(specs, kopts={"path": browser, "mathjax": False, "timeout": timeout_s})
    except Exception as e:  # a browser that cannot start (sandbox, display, crash): say why, keep the HTML
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return [p for p in paths if p.is_file() and p.stat().st_size > 0], \
            f"static export with {browser} failed: {type(e).__name__}: {first}"
    return [p for p in paths if p.is_file() and p.stat().st_size > 0], ""
