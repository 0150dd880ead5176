"""The HTTP service: FastAPI over a :class:`~twotower.recommend.Recommender`.

The HTTP layer only checks requests and shapes answers; ranking is
:meth:`Recommender.recommend_queries`, the same as ``twotower recommend``.

- Dynamic micro-batching: concurrent requests queue up and are answered together, one
  query-tower forward and one index search per batch. A batch is closed when it holds
  ``max_micro_batch`` queries or ``max_wait_ms`` after its first request, and runs in a
  worker thread so the event loop keeps accepting requests meanwhile.
- Swap without downtime: SIGHUP under ``twotower serve`` (or ``POST /v1/admin/reload``
  when the operator set a reload token) re-reads the model and index directories the
  service was started with, off to the side, answers a query with them, and only then
  replaces the one reference requests read. A request keeps the recommender it started
  with; a pair that does not load is refused, the reason goes to the server log only,
  and the old model keeps serving. No request names a path on the server.
- Clear client errors: malformed JSON is a 400, a body over ``max_body_bytes`` a 413,
  a body not sent as JSON a 415, anything else wrong (unknown or missing features, wrong
  types, ``k`` or a batch over its limit) a 422 whose ``loc`` names the field.
- Bounded waiting: a request's headers and body must arrive within
  ``request_timeout_s`` (:mod:`twotower.arrival`), or the client gets a 408; headers
  over ``max_head_bytes`` get a 431.

fastapi and uvicorn are imported only here (``pip install 'twotower[serve]'``).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at run
# time, and the request models are built per app (they carry its limits).
import asyncio
import datetime
import logging
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from starlette.middleware.trustedhost import TrustedHostMiddleware

from twotower import __version__
from twotower.access import admin_guard, answered_hosts
from twotower.recommend import (
    MAX_POPULARITY_PENALTY,
    Query,
    QueryError,
    Recommendation,
    Recommender,
)

__all__ = ["Limits", "MicroBatcher", "create_app", "serve"]


def _escaped(value: Any) -> Any:
    """A string with any lone surrogate written as ``\\ud800``: answers are UTF-8, which
    has no form for one, and a client may send one (JSON allows it) in a field name."""
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) \
        else value


def _unicode_id(value: int | str) -> int | str:
    if isinstance(value, str) and _escaped(value) != value:
        raise ValueError("a string id must be valid Unicode (no lone surrogates)")
    return value


Id = Annotated[StrictInt | StrictStr, AfterValidator(_unicode_id)]
log = logging.getLogger("twotower.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how requests are coalesced."""

    max_k: int = 1000
    max_batch: int = 256  # queries in one /v1/recommend/batch request
    max_exclude: int = 10_000  # excluded items of one query
    max_body_bytes: int = 1 << 20
    max_micro_batch: int = 256  # queries in one forward + search
    max_wait_ms: float = 1.0
    timeout_s: float = 30.0  # for an answer, once the request has arrived
    request_timeout_s: float = 10.0  # for a request's headers and body to arrive
    max_head_bytes: int = 32 * 1024  # request line and headers (served by ``serve``)


class MicroBatcher:
    """Coalesces concurrent queries into batches answered in one worker thread."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def _ensure_worker(self) -> None:
        """Start the worker on first use (and again after :meth:`close` or on a new loop)."""
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="twotower-batch")
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._work())

    async def submit(self, recommender: Recommender, queries: list[Query],
                     timeout_s: float = 30.0) -> list[Recommendation]:
        """Answers of ``queries`` by ``recommender`` (the one the request started with).

        Raises ``TimeoutError`` if no answer comes within ``timeout_s``.
        """
        self._ensure_worker()
        future = self._loop.create_future()
        # A timer rather than asyncio.wait_for, which costs a task per request.
        timer = self._loop.call_later(timeout_s, _expire, future, timeout_s)
        self._queue.put_nowait((recommender, queries, future))
        try:
            return await future
        finally:
            timer.cancel()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size, deadline = len(batch[0][1]), loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                size += len(item[1])
            try:
                answers = await loop.run_in_executor(self._executor, _answer, batch)
            except Exception as error:  # never let the worker die: fail this batch only
                answers = [error] * len(batch)
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

    def close(self) -> None:
        """Stop the worker; requests still queued get no answer (the server is stopping)."""
        if self._task is not None:
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._task = self._executor = None


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"no answer within {timeout_s} s"))


def _answer(batch: list) -> list:
    """Answer a batch, one forward + search per recommender (two only during a swap).

    If a group fails as a whole, its requests are retried one by one so that one bad
    request cannot fail the others.
    """
    answers: list = [None] * len(batch)
    groups: dict[int, list[int]] = {}
    for i, (recommender, _, _) in enumerate(batch):
        groups.setdefault(id(recommender), []).append(i)
    for members in groups.values():
        recommender = batch[members[0]][0]
        try:
            flat = recommender.recommend_queries([q for i in members for q in batch[i][1]])
        except Exception:
            for i in members:
                try:
                    answers[i] = recommender.recommend_queries(batch[i][1])
                except Exception as error:
                    answers[i] = error
            continue
        start = 0
        for i in members:
            answers[i] = flat[start:start + len(batch[i][1])]
            start += len(batch[i][1])
    return answers


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets a 413 before the app reads it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(scope, receive, send)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        response = JSONResponse({"detail": f"request body over the limit of {self.limit} "
                                 "bytes; send fewer queries per request"}, status_code=413)
        await response(scope, receive, send)


def _request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """Pydantic models of a query and a batch, with this service's limits."""

    class RecommendRequest(BaseModel):
        """One query: ``features`` by name, or ``user`` and ``history`` for the default model."""

        model_config = ConfigDict(extra="forbid")
        features: dict[str, Any] | None = Field(
            None, description="query features by name: ids (integers or strings), id lists, "
            "numbers", examples=[{"user_id": 17, "history": [3, 5, 8]}])
        user: Id | None = Field(None, description="the user id (instead of features)")
        history: list[Id] | None = Field(None, description="the user's recent items, oldest "
                                         "first (instead of features)")
        k: StrictInt = Field(10, ge=1, le=limits.max_k, description="number of items")
        exclude: list[Id] = Field([], max_length=limits.max_exclude,
                                  description="item keys never to return")
        exclude_history: StrictBool = Field(False, description="also exclude history items")
        # Range checked by Recommender.parse (pydantic's own check overflows on a huge int).
        popularity_penalty: StrictFloat | StrictInt = Field(
            0.0, description="beta: rank by <u, v> - beta log p_hat(item), |beta| <= "
            f"{MAX_POPULARITY_PENALTY:g}")

    class BatchRequest(BaseModel):
        """Many queries, answered in order."""

        model_config = ConfigDict(extra="forbid")
        queries: list[RecommendRequest] = Field(min_length=1, max_length=limits.max_batch)

    return RecommendRequest, BatchRequest


class RecommendResponse(BaseModel):
    items: list[int | str]
    scores: list[float]


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


class ReloadRequest(BaseModel):
    """No fields: a reload re-reads the directories the service was started with."""

    model_config = ConfigDict(extra="forbid")


def _error(status: int, message: str, loc: tuple = ()) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": [_escaped(part) for part in loc],
                                     "msg": _escaped(message)}]}, status_code=status)


def _query(recommender: Recommender, request: Any, loc: tuple) -> Query:
    """A checked :class:`Query` from a request body (user/history or features)."""
    features = request.features
    if features is None:
        if request.user is None and request.history is None:
            raise QueryError("give features, or user (and history)", loc)
        user = (recommender.config.get("columns") or {}).get("user", "user")
        features = {} if request.user is None else {user: request.user}
        features.update({n: request.history or [] for n in recommender.history_features})
    elif request.user is not None or request.history is not None:
        raise QueryError("give either features or user and history, not both", loc)
    return recommender.parse(features, request.k, request.exclude, request.exclude_history,
                             request.popularity_penalty, loc)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _payload(result: Recommendation) -> dict:
    return {"items": result.keys, "scores": result.scores}


def create_app(recommender: Recommender, limits: Limits | None = None,
               reload_token: str | None = None, reload_on_sighup: bool = False,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The service for ``recommender``; the OpenAPI description is at ``/openapi.json``.

    A reload (``POST /v1/admin/reload`` with ``reload_token``, SIGHUP with
    ``reload_on_sighup``) re-reads the directories ``recommender`` was loaded from.
    ``allowed_hosts`` (default: any) are the ``Host`` header values answered.
    """
    limits = limits or Limits()
    directories = (recommender.model_dir, recommender.index_dir)
    if (reload_token is not None or reload_on_sighup) and None in directories:
        raise ValueError("a reload re-reads the model and index directories, but this "
                         "recommender was not loaded from directories")
    RecommendRequest, BatchRequest = _request_models(limits)
    batcher = MicroBatcher(limits.max_micro_batch, limits.max_wait_ms / 1000)
    state: dict[str, Any] = {"recommender": recommender, "ready": True, "reloads": 0,
                             "loaded_at": _now(), "lock": None, "tasks": set()}

    async def reload() -> JSONResponse:
        if state["lock"] is None:
            state["lock"] = asyncio.Lock()
        async with state["lock"]:
            try:
                fresh = await asyncio.to_thread(Recommender.load, *directories)
            except Exception as error:  # whatever is wrong with the new one, keep the old one
                log.warning("reload refused, still serving the previous model: %s: %s",
                            type(error).__name__, error)
                return _error(409, "reload refused: the model and index directories do not "
                              "load as a matching pair; still serving the previous model "
                              "(the server log says why)")
            state["recommender"] = fresh
            state["reloads"] += 1
            state["loaded_at"] = _now()
            log.info("reloaded the model and index directories (reload %d)", state["reloads"])
            return JSONResponse({"status": "reloaded", "corpus_size": len(fresh.index),
                                 "reloads": state["reloads"]})

    async def lifespan(app: FastAPI):
        if reload_on_sighup:
            loop = asyncio.get_running_loop()

            def on_sighup() -> None:
                task = loop.create_task(reload())
                state["tasks"].add(task)
                task.add_done_callback(state["tasks"].discard)

            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        yield
        state["ready"] = False
        batcher.close()

    app = FastAPI(title="twotower", version=__version__, lifespan=lifespan,
                  description="Top-K candidate retrieval from a two-tower model.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [_escaped(part) for part in e["loc"]], "msg": _escaped(e["msg"]),
                   "type": e["type"]} for e in error.errors()]
        if "json" not in request.headers.get("content-type", ""):
            return _error(415, "send the body as JSON, with the header 'content-type: "
                          "application/json'", ("header", "content-type"))
        malformed = any(e["type"] == "json_invalid" for e in errors)
        return JSONResponse({"detail": errors}, status_code=400 if malformed else 422)

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, error: QueryError) -> JSONResponse:
        return _error(422, str(error), error.loc)

    async def answer(current: Recommender, queries: list[Query]) -> list[Recommendation]:
        try:
            return await batcher.submit(current, queries, limits.timeout_s)
        except TimeoutError as error:
            raise HTTPException(503, f"{error}; try again") from None

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest) -> JSONResponse:
        """Top-k item keys and scores for one query."""
        current = state["recommender"]
        [result] = await answer(current, [_query(current, body, ("body",))])
        return JSONResponse(_payload(result))

    @app.post("/v1/recommend/batch", response_model=BatchResponse)
    async def recommend_batch(body: BatchRequest) -> JSONResponse:
        """Top-k for each of many queries, in order."""
        current = state["recommender"]
        queries = [_query(current, q, ("body", "queries", i)) for i, q in enumerate(body.queries)]
        results = await answer(current, queries)
        return JSONResponse({"results": [_payload(r) for r in results]})

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """A model is loaded and requests are being answered."""
        if not state["ready"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ready", "corpus_size": len(state["recommender"].index)})

    @app.get("/v1/model")
    async def model() -> dict:
        """Versions, corpus size, index kind and measured recall, training metrics, limits."""
        return {**state["recommender"].describe(), "limits": asdict(limits),
                "loaded_at": state["loaded_at"], "reloads": state["reloads"],
                "twotower": __version__}

    if reload_token is not None:
        @app.post("/v1/admin/reload", dependencies=[Depends(admin_guard(reload_token))])
        async def admin_reload(body: ReloadRequest | None = None) -> JSONResponse:
            """Re-read the model and index directories the service was started with and swap
            them in without dropping requests; a pair that does not load is refused (409)."""
            return await reload()

    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts),
                           www_redirect=False)
    return app


def serve(model_dir: str, index_dir: str, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None, threads: int | None = None,
          reload_token: str | None = None, allowed_hosts: Sequence[str] = (),
          log_level: str = "warning") -> None:
    """Load, check and serve ``model_dir`` with ``index_dir`` until interrupted.

    ``threads`` (default: the cores, at most 4) bounds torch and faiss (OpenMP) threads
    for a batch; the event loop handling HTTP needs a share of the same cores. The
    ``Host`` values answered are :func:`twotower.access.answered_hosts`.
    """
    import faiss
    import torch
    import uvicorn

    from twotower.arrival import arrival_deadline_protocol

    threads = threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    limits = limits or Limits()
    app = create_app(Recommender.load(model_dir, index_dir), limits, reload_token,
                     reload_on_sighup=True, allowed_hosts=answered_hosts(host, allowed_hosts))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                http=arrival_deadline_protocol(limits.request_timeout_s, limits.max_head_bytes),
                ws="none")
