"""What every studio page shares: the `Studio` (workspace, job queue, templates), the session and
CSRF gate in front of every route, role checks, and the small replies a route gives.

The gate is plain ASGI middleware that reads only headers: a request without a live session gets
401 (or, for a page, a redirect to the login form), except `/login`, `/health`, `/static/` and the
read-only `/share/` pages; a state-changing request (anything but GET and HEAD) must carry the
session's CSRF token in the `X-CSRF-Token` header, which the studio's script adds to every form it
posts. Cookies are HttpOnly and SameSite=Strict, and every reply forbids framing and runs no script
but the studio's own (a Content-Security-Policy without inline scripts).
"""

from __future__ import annotations

import hmac
import math
import os
import time
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import jinja2
from fastapi import HTTPException, Request
from fastapi import Path as Path_
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from llmlab.studio.jobs import JobQueue
from llmlab.studio.store import ROLES, Store, StudioError
from llmlab.track.registry import Registry

COOKIE = "llmlab_session"
Id = Annotated[int, Path_(ge=0, le=2**63 - 1)]  # a run, job or link id: what SQLite's integers hold
OPEN = ("/login", "/health", "/static/", "/share/")
SAFE_METHODS = ("GET", "HEAD")
HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                  b"img-src 'self' data: blob:; frame-ancestors 'none'; form-action 'self'"),
]
TEMPLATES = Path(__file__).parent / "templates"


class FieldError(StudioError):
    """A form value that cannot be used; the studio shows the message beside the field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class Studio:
    """One workspace's studio: where things are, the job queue, and the page templates."""

    def __init__(self, workspace: str | os.PathLike, *, devices: tuple[str, ...] = ("cpu",),
                 max_upload_bytes: int = 512 * 2**20, secure_cookies: bool = False):
        self.workspace = Path(workspace).resolve()
        self.devices = devices
        self.max_upload_bytes = max_upload_bytes
        self.secure_cookies = secure_cookies
        self.queue = JobQueue(self.workspace, devices)
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                            trim_blocks=True, lstrip_blocks=True)
        self.templates.filters.update(when=when, number=number)

    def registry(self) -> Registry:
        """The workspace's registry, a connection of the caller's own (use it in a `with` block)."""
        return Registry(self.workspace)

    def store(self) -> Store:
        """The studio's database, a connection of the caller's own (use it in a `with` block)."""
        return Store(self.workspace)

    def page(self, request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
        session = getattr(request.state, "session", None)
        html = self.templates.get_template(template).render(session=session, path=request.url.path,
                                                            workspace=self.workspace.name, **context)
        return HTMLResponse(html, status_code=status_code)

    def inside(self, relative: str, label: str) -> Path:
        """The workspace path `relative` names, refused when it leads outside the workspace."""
        if not relative or "\0" in relative:
            raise FieldError(f"{label}: expected a path inside the workspace", label)
        path = (self.workspace / relative).resolve()
        if not path.is_relative_to(self.workspace):
            raise FieldError(f"{label}: {relative!r} lies outside the workspace", label)
        return path


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else ""


def number(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


# --------------------------------------------------------------------------- the gate


class Gate:
    """Sessions, CSRF and security headers in front of the app (ASGI middleware)."""

    def __init__(self, app, studio: Studio):
        self.app = app
        self.studio = studio

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        session = None
        token = _cookie(headers.get("cookie", ""), COOKIE)
        if token:
            with self.studio.store() as store:
                session = store.session(token)
        scope.setdefault("state", {})["session"] = session
        scope["state"]["token"] = token

        async def secured(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + HEADERS
            await send(message)

        if not path.startswith(OPEN):
            if session is None:
                page = method in SAFE_METHODS and "text/html" in headers.get("accept", "")
                target = "/login" + (f"?next={quote(path)}" if path != "/" else "")
                reply = RedirectResponse(target, status_code=303) if page else \
                    JSONResponse({"error": "log in first"}, status_code=401)
                return await reply(scope, receive, secured)
            if method not in SAFE_METHODS and not hmac.compare_digest(headers.get("x-csrf-token", "").encode(),
                                                                      session["csrf"].encode()):
                reply = JSONResponse({"error": "missing or wrong CSRF token; reload the page"}, status_code=403)
                return await reply(scope, receive, secured)
        await self.app(scope, receive, secured)


def _cookie(header: str, name: str) -> str | None:
    try:
        cookie = SimpleCookie(header)
    except CookieError:  # a malformed Cookie header is no session
        return None
    return cookie[name].value if name in cookie else None


def need(request: Request, role: str) -> dict:
    """The session, refused with 403 unless its user has at least `role`."""
    session = request.state.session
    if session is None or ROLES.index(session["role"]) < ROLES.index(role):
        raise HTTPException(403, f"needs the {role} role")
    return session


def done(url: str, **extra) -> JSONResponse:
    """The reply to a form the studio's script posted: where to go next."""
    return JSONResponse({"redirect": url, **extra})


def refused(message: str, field: str | None = None, status_code: int = 400) -> JSONResponse:
    """The reply to a form that cannot be done: the message, shown beside `field` when given."""
    return JSONResponse({"error": message, "field": field}, status_code=status_code)
