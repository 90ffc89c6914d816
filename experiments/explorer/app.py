"""The explorer's web app: FastAPI routes over an Explorer (core.py), pages rendered on the server
with Jinja2 (templates/), one small CSS and one small JS file (static/), nothing from elsewhere.

    python run_experiments.py --serve STUDY_ID [--port 8000] [--host 127.0.0.1]

Pages: / (the study), /arm/{arm} (its latents), /arm/{arm}/latent/{i}, /arm/{arm}/analyse,
/arm/{arm}/steer, /search; JSON: /api/study, /api/arm/{arm}/features, /api/arm/{arm}/latent/{i},
POST /api/arm/{arm}/analyse and /api/arm/{arm}/steer (a JSON object), /api/search. Files: /static/*
from the package's folder, /report/* from the study's report folder, each resolved and checked to
lie inside it. A bad request gets its status (4xx) and a one-line message, as a page or as
{"error": ...}; the server keeps serving."""
from __future__ import annotations

import ipaddress
import json
import math
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from config.schema import RunConfig, UsageError
from experiments.explorer.core import (ALPHA_MAX, MAX_LATENTS, MAX_NEW_TOKENS, MODES, Explorer, ExplorerError)

HERE = Path(__file__).resolve().parent
BODY_LIMIT = 64 * 1024  # bytes of a request body
SECURITY_HEADERS = {
    # Everything is local: scripts and styles from /static only (inline style attributes shade tokens).
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


# --- rendering helpers (Jinja filters and inline SVG) -------------------------------------------


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    x = float(x)
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 10 ** 6):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.1f}"


def _pct(x: Any) -> str:
    if x is None:
        return "–"
    return "0%" if x == 0 else f"{float(x) * 100:.3g}%"


def _token(text: str) -> str:
    """A token as shown: newlines as ↵, a token of spaces only as ␣ (leading spaces kept)."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    return text if text.strip() else "␣" * max(1, len(text))


def _chip(text: str) -> str:
    """A token in a chip: without its leading or trailing spaces, unless it is nothing else."""
    return text.strip() or _token(text)


def _shade(act: float, top: float) -> str:
    """Background alpha proportional to act / top (orange; dark text stays readable at alpha 1)."""
    a = 0.0 if top <= 0 or act <= 0 else min(1.0, act / top)
    return f"background-color: rgba(255, 140, 0, {a:.2f})"


def _svg_histogram(counts: list[int], edges: list[float], width: int = 420, height: int = 140) -> str:
    """A bar chart of the activation histogram, as inline SVG."""
    left, bottom, top_pad = 44, 22, 8
    w, h = width - left - 8, height - bottom - top_pad
    peak = max(counts) if counts and max(counts) > 0 else 1
    bar = w / max(1, len(counts))
    bars = "".join(
        f'<rect x="{left + j * bar:.1f}" y="{top_pad + h - h * c / peak:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{h * c / peak:.1f}"><title>{_num(edges[j])}–{_num(edges[j + 1])}: {c:,}</title></rect>'
        for j, c in enumerate(counts))
    axis = (f'<line x1="{left}" y1="{top_pad + h}" x2="{left + w}" y2="{top_pad + h}" class="axis"/>'
            f'<text x="{left}" y="{height - 6}">0</text>'
            f'<text x="{left + w}" y="{height - 6}" text-anchor="end">{_num(edges[-1] if edges else 0)}</text>'
            f'<text x="{left - 4}" y="{top_pad + 10}" text-anchor="end">{peak:,}</text>'
            f'<text x="{left - 4}" y="{top_pad + h}" text-anchor="end">0</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="activation histogram"><g class="bars">{bars}</g>{axis}</svg>')


def _svg_sparkline(points: list[dict], width: int = 420, height: int = 140) -> str:
    """Density at each eval against training tokens, as inline SVG."""
    if not points:
        return '<p class="muted">No eval files (probes/eval-*.npz) for this arm.</p>'
    left, bottom, top_pad = 64, 22, 8
    w, h = width - left - 12, height - bottom - top_pad
    xs = [p["tokens"] for p in points]
    ys = [p["density"] for p in points]
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) if max(ys) > 0 else 1.0

    def xy(p: dict) -> tuple[float, float]:
        x = left + (w * (p["tokens"] - x0) / (x1 - x0) if x1 > x0 else w / 2)
        return x, top_pad + h - h * p["density"] / y1

    coords = [xy(p) for p in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5"><title>step {p["step"]:,} ({p["tokens"]:,} tokens): '
                   f'{_pct(p["density"])}</title></circle>' for (x, y), p in zip(coords, points))
    axis = (f'<line x1="{left}" y1="{top_pad + h}" x2="{left + w}" y2="{top_pad + h}" class="axis"/>'
            f'<text x="{left - 4}" y="{top_pad + 10}" text-anchor="end">{_pct(y1)}</text>'
            f'<text x="{left - 4}" y="{top_pad + h}" text-anchor="end">0</text>'
            f'<text x="{left}" y="{height - 6}">{x0:,} tok</text>'
            f'<text x="{left + w}" y="{height - 6}" text-anchor="end">{x1:,} tok</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="density over training"><polyline points="{line}"/>{dots}{axis}</svg>')


# The study table's metrics: a short header and how each is shown.
METRICS = {"l0": ("L0", "num1"), "explained_variance": ("expl. var.", "num4"), "mse": ("MSE", "num4"),
           "dead_frac": ("dead", "pct"), "dense_frac": ("dense", "pct"), "ce_loss_recovered": ("CE recovered", "num4"),
           "kl": ("KL", "num4"), "mcc": ("MCC", "num4"), "frac_recovered": ("recovered", "pct")}


def _metric(value: Any, name: str) -> str:
    kind = METRICS.get(name, (name, "num4"))[1]
    return _pct(value) if kind == "pct" else _num(value, 1 if kind == "num1" else 4)


def _templates():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, pct=_pct, token=_token, chip=_chip, metric=_metric, u=lambda s: quote(str(s), safe=""),
                       up=lambda s: quote(str(s), safe="/"))
    env.globals.update(METRICS=METRICS, shade=_shade, svg_histogram=_svg_histogram, svg_sparkline=_svg_sparkline, urlencode=urlencode,
                       MODES=MODES, MAX_NEW_TOKENS=MAX_NEW_TOKENS, MAX_LATENTS=MAX_LATENTS, ALPHA_MAX=ALPHA_MAX)
    return env


# --- the app ---------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it declares its length
    or streams it."""

    def __init__(self, app, limit: int = BODY_LIMIT) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        seen, started = 0, False

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"the request body is larger than {self.limit // 1024} KiB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(explorer: Explorer, allowed_hosts: list[str] | None = None):
    """The FastAPI app over `explorer`. `allowed_hosts` (Host header values; None: any) guards a
    loopback server against DNS rebinding."""
    env = _templates()
    app = FastAPI(title="SAE explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=BODY_LIMIT)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def render(template: str, status: int = 200, **context) -> HTMLResponse:
        study = explorer.record
        html = env.get_template(template).render(study_id=study.study_id, study_status=study.status, **context)
        return HTMLResponse(html, status_code=status)

    def error(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        try:
            return render("error.html", status, title=f"Error {status}", code=status, message=message)
        except Exception:  # a study.json that cannot be read any more: still answer in one line
            return HTMLResponse(f"<!doctype html><title>Error {status}</title><p>{status}: "
                                f"{_escape(message)}</p>", status_code=status)

    @app.exception_handler(ExplorerError)
    async def explorer_error(request: Request, err: ExplorerError):
        return error(request, err.status, str(err))

    @app.exception_handler(UsageError)
    async def usage_error(request: Request, err: UsageError):
        return error(request, 409, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = {404: f"there is no page {request.url.path[:120]!r}",
                   405: f"{request.method} is not allowed on {request.url.path[:120]!r}"}.get(err.status_code,
                                                                                           str(err.detail))
        return error(request, err.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in err.errors()]
        return error(request, 422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return error(request, 500, f"internal error ({type(err).__name__}); the server keeps running, see its "
                                   f"console")

    async def call(fn, *args, **kwargs):
        return await run_in_threadpool(fn, *args, **kwargs)

    async def json_body(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ExplorerError("send a JSON object with content-type application/json", 415)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ExplorerError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ExplorerError("the request body must be a JSON object")
        return body

    def only(body: dict, allowed: set[str]) -> dict:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ExplorerError(f"unknown field(s) {', '.join(map(str, unknown))[:120]}; known: "
                                f"{', '.join(sorted(allowed))}")
        return body

    def arm_context(arm: str) -> dict:
        rec = explorer.arm(arm)
        return {"arm": next(a for a in explorer.arms() if a["arm_id"] == rec.arm_id)}

    # --- pages -------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def study_page():
        return render("study.html", title="study", study=await call(explorer.study))

    @app.get("/arm/{arm}", response_class=HTMLResponse)
    async def table_page(arm: str, sort: str | None = None, order: str | None = None, page: str = "1",
                         per_page: str = "100", q: str = ""):
        ctx = arm_context(arm)
        table = await call(explorer.features_table, arm, sort, order, page, per_page, q)
        return render("table.html", title=f"{table['arm']}: latents", table=table, **ctx)

    @app.get("/arm/{arm}/latent/{latent}", response_class=HTMLResponse)
    async def latent_page(arm: str, latent: str):
        ctx = arm_context(arm)
        feature = await call(explorer.feature, arm, latent)
        return render("latent.html", title=f"{feature['arm']}: latent {feature['latent']}", f=feature, **ctx)

    @app.get("/arm/{arm}/analyse", response_class=HTMLResponse)
    async def analyse_page(arm: str, prompt: str = ""):
        ctx = arm_context(arm)
        await call(explorer.trained, arm)  # a synthetic arm's answer: no model to run
        result, message = None, None
        if prompt:
            try:
                result = await call(explorer.analyse, prompt, arm)
            except ExplorerError as err:
                if err.status != 400:
                    raise
                message = str(err)
        return render("analyse.html", status=400 if message else 200, title=f"{ctx['arm']['name']}: analyse",
                    prompt=prompt, result=result, message=message, **ctx)

    @app.get("/arm/{arm}/steer", response_class=HTMLResponse)
    async def steer_page(arm: str, prompt: str = "", latents: str = "", alpha: str = "8", mode: str = "add",
                         max_new_tokens: str = "20", seed: str = "0", temperature: str = "0"):
        ctx = arm_context(arm)
        await call(explorer.trained, arm)  # a synthetic arm's answer: no model to run
        form = {"prompt": prompt, "latents": latents, "alpha": alpha, "mode": mode, "max_new_tokens": max_new_tokens,
                "seed": seed, "temperature": temperature}
        result, message = None, None
        if prompt or latents:
            try:
                result = await call(explorer.steer, prompt, arm, latents, alpha, mode, max_new_tokens, seed,
                                    temperature)
            except ExplorerError as err:
                if err.status != 400:
                    raise
                message = str(err)
        scale = None
        if result is not None and ctx["arm"]["has_features"]:
            feats = [await call(explorer.feature, arm, lat["latent"]) for lat in result["latents"]]
            scale = {f["latent"]: f["stats"]["max_act"] for f in feats}
        return render("steer.html", status=400 if message else 200, title=f"{ctx['arm']['name']}: steer", form=form,
                    result=result, message=message, scale=scale, **ctx)

    @app.get("/search", response_class=HTMLResponse)
    async def search_page(q: str = ""):
        result = await call(explorer.search, q) if q.strip() else None
        return render("search.html", title=f"search {q}" if q else "search", q=q, result=result)

    @app.get("/report/{path:path}")
    async def report_file(path: str):
        found, media = explorer.report_file(path)
        return FileResponse(found, media_type=media)

    # --- JSON --------------------------------------------------------------------------------

    @app.get("/api/study")
    async def api_study():
        return await call(explorer.study)

    @app.get("/api/arm/{arm}/features")
    async def api_features(arm: str, sort: str | None = None, order: str | None = None, page: str = "1",
                           per_page: str = "100", q: str = ""):
        return await call(explorer.features_table, arm, sort, order, page, per_page, q)

    @app.get("/api/arm/{arm}/latent/{latent}")
    async def api_latent(arm: str, latent: str):
        return await call(explorer.feature, arm, latent)

    @app.post("/api/arm/{arm}/analyse")
    async def api_analyse(arm: str, request: Request):
        body = only(await json_body(request), {"prompt", "top"})
        return await call(explorer.analyse, body.get("prompt"), arm, body.get("top", 20))

    @app.post("/api/arm/{arm}/steer")
    async def api_steer(arm: str, request: Request):
        body = only(await json_body(request), {"prompt", "latents", "alpha", "mode", "max_new_tokens", "seed",
                                               "temperature"})
        return await call(explorer.steer, body.get("prompt"), arm, body.get("latents"), body.get("alpha", 0.0),
                          body.get("mode", "add"), body.get("max_new_tokens", 20), body.get("seed", 0),
                          body.get("temperature", 0.0))

    @app.get("/api/search")
    async def api_search(q: str = "", arm: str | None = None):
        return await call(explorer.search, q, arm)

    return app


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- serving -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); UsageError in one line when that fails (port in use,
    an address this machine does not have)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: not an address this machine can listen on ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        what = "is in use" if err.errno in (98, 48) else f"cannot be used ({err.strerror})"
        raise UsageError(f"--port {port}: {host}:{port} {what}; pick another with --port N (0: any free port)") from None
    sock.set_inheritable(True)
    return sock


def serve_study(cfg: RunConfig) -> int:
    """--serve STUDY_ID [--port N] [--host ADDR]: the explorer on the study under --checkpoint-dir,
    until Ctrl-C."""
    import torch
    import uvicorn

    study_dir = Path(cfg.log.checkpoint_dir) / cfg.study.serve
    try:
        explorer = Explorer(study_dir)
    except ExplorerError as err:
        raise UsageError(f"--serve: {err}") from None
    host, port = cfg.study.host, cfg.study.port
    sock = bind(host, port)  # before loading anything: a port in use answers at once
    port = sock.getsockname()[1]
    # One request is one short sequence: tiny matmuls on several threads only wait for each other
    # (a tinylm forward took 85 ms on 2 threads of a busy machine, 2 ms on one).
    torch.set_num_threads(1)
    record = explorer.record
    runs = [a for a in record.finished if explorer.source(a) == "transformer"]
    if runs:
        print(f"loading the subject model of {runs[0].name} ...", flush=True)
        try:
            explorer.trained(runs[0])
        except ExplorerError as err:
            print(f"warning: {err}; the prompt analyser and steering will answer with it", file=sys.stderr)
    unfinished = [f"{a.name} ({a.status})" for a in record.arms if a.status != "complete"]
    if unfinished:
        print(f"study {record.study_id} is {record.status}; not finished, and shown as such: {', '.join(unfinished)}")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    if not is_loopback(host):
        print(f"warning: --host {host}: anyone who can reach port {port} of this machine can read the study and "
              f"run the model through this server", file=sys.stderr)
    allowed = None if not is_loopback(host) else ["127.0.0.1", "localhost", "[::1]", "::1", host]
    app = create_app(explorer, allowed_hosts=allowed)
    print(f"explorer for study {record.study_id}: {url} (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    # uvicorn handles Ctrl-C and SIGTERM while it serves, then hands the signal on to the handler it
    # found: make that one quiet (run_experiments.py's would announce a training checkpoint).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("explorer stopped")
    return 0
