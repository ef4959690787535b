"""`llmlab studio`: the web platform over a workspace. `create_app` builds the FastAPI app: the
session gate (`web.Gate`), login and logout, the static files (plotly.js from the `plotly` wheel,
never a CDN), and the pages of `runs`, `workflow` and `chat`. The job queue starts and stops with
the app; the jobs it started outlive it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.common import LlmlabError
from llmlab.studio import chat, runs, workflow
from llmlab.studio.store import Throttled
from llmlab.studio.web import COOKIE, Gate, Studio, refused

STATIC = Path(__file__).parent / "static"


def plotly_js() -> Path:
    """plotly.js from the plotly package (checking the studio's other extra, form parsing, too)."""
    import importlib.util

    try:
        import plotly
    except ImportError:
        plotly = None
    if plotly is None or importlib.util.find_spec("python_multipart") is None:
        raise LlmlabError("the studio needs plotly (its charts' plotly.js) and python-multipart (forms): "
                          "pip install 'llmlab[studio]'")
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def create_app(studio: Studio) -> FastAPI:
    plotly = plotly_js()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        studio.queue.start()
        try:
            yield
        finally:
            studio.queue.close()
            chat.unload()

    app = FastAPI(title="llmlab studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.studio = studio

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if "text/html" in request.headers.get("accept", "") and request.method == "GET":
            return studio.page(request, "error.html", status_code=e.status_code, status=e.status_code,
                               message=e.detail)
        return JSONResponse({"error": e.detail}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = []
        for error in e.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        first = e.errors()[0].get("loc", ())[1:] if e.errors() else ()
        return refused("; ".join(problems), str(first[0]) if first else None, status_code=422)

    @app.exception_handler(LlmlabError)
    async def llmlab_error(request: Request, e: LlmlabError):
        return refused(str(e), getattr(e, "field", None))

    @app.exception_handler(OSError)
    async def cannot(request: Request, e: OSError):  # a read-only or full disk: what, where, and no traceback
        where = Path(e.filename) if e.filename else None
        if where is not None and where.is_relative_to(studio.workspace):
            where = where.relative_to(studio.workspace)
        return refused(f"{where or 'the workspace'}: {e.strerror or e}", status_code=409)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        print(f"llmlab studio: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the studio's log has the details"},
                            status_code=500)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/static/plotly.min.js")
    def plotly_file():
        return FileResponse(plotly, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/static/{name}")
    def static(name: str):
        file = STATIC / name
        if "/" in name or name.startswith(".") or not file.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(file, headers={"Cache-Control": "no-cache"})

    @app.get("/login")
    def login_page(request: Request, next: str = "/"):
        return studio.page(request, "login.html", next=_local(next), error=None)

    @app.post("/login")
    def login(request: Request, name: str = Form("", max_length=64), password: str = Form("", max_length=1024),
              next: str = Form("/", max_length=2000)):
        with studio.store() as store:
            try:
                user = store.authenticate(name, password)
            except Throttled as e:
                reply = studio.page(request, "login.html", status_code=429, next=_local(next), error=str(e))
                reply.headers["Retry-After"] = str(int(e.seconds) + 1)
                return reply
            if user is None:
                return studio.page(request, "login.html", status_code=401, next=_local(next),
                                   error="wrong name or password")
            token, _ = store.start_session(user["name"])
        reply = RedirectResponse(_local(next), status_code=303)
        reply.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=studio.secure_cookies, path="/")
        return reply

    @app.post("/logout")
    def logout(request: Request):
        with studio.store() as store:
            store.end_session(request.state.token)
        reply = JSONResponse({"redirect": "/login"})
        reply.delete_cookie(COOKIE, path="/")
        return reply

    app.include_router(runs.router(studio))
    app.include_router(workflow.router(studio))
    app.include_router(chat.router(studio))
    app.add_middleware(Gate, studio=studio)
    return app


def _local(url: str) -> str:
    """`url` when it is a path of this site, else "/" (no redirect to another site after login)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"
