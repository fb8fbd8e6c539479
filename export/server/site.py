"""The live page for people: ``GET /`` (``page/index.html``) and its assets ``GET /page/NAME``.

Plain HTML, CSS and JavaScript shipped in the package (no build step, nothing fetched from another
origin, so it works offline). The page carries no secret, so these paths answer without the API key;
every API call the page makes sends the key the user typed, held in the page's memory only. The
Content-Security-Policy allows only this origin's scripts, styles and requests (no inline script or
style) and images from ``data:`` / ``blob:`` URLs, the generated PNGs.
"""

from __future__ import annotations

from pathlib import Path

PAGE_DIR = Path(__file__).resolve().parent / "page"
INDEX = "index.html"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8"}
ASSETS = ("page.css", "page.js")  # served at /page/NAME; nothing else under /page/ exists
PAGE_ROUTE, ASSET_ROUTE = "/", "/page/{name}"  # their metrics route labels

CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def page_files() -> dict[str, tuple[bytes, str]]:
    """``{URL path: (content, media type)}`` for the page and its assets, read once."""
    files = {PAGE_ROUTE: INDEX, **{f"/page/{name}": name for name in ASSETS}}
    return {path: ((PAGE_DIR / name).read_bytes(), MEDIA_TYPES[Path(name).suffix]) for path, name in files.items()}


def route_label(path: str) -> str | None:
    """The metrics route label of a page path, None for any other path."""
    if path == PAGE_ROUTE:
        return PAGE_ROUTE
    if path.startswith("/page/") and path[len("/page/"):] in ASSETS:
        return ASSET_ROUTE
    return None
