"""The HTTP service, in process: answers, clear 4xx errors, micro-batching, hot swap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ports import free_port
from tiny_serving import make_artifacts, make_model, without_fingerprint
from twotower.index import index_items
from twotower.recommend import Recommender
from twotower.serve import Limits, MicroBatcher, create_app

LIMITS = Limits(max_k=50, max_batch=4, max_body_bytes=4000)
TOKEN = "a-reload-secret-of-some-length"
ADMIN = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_artifacts(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def other(artifacts, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second model and its index, for swaps."""
    root = tmp_path_factory.mktemp("other")
    model = make_model(root / "model", seed=1)
    return model, index_items(model, artifacts[1]).save(root / "index")


@pytest.fixture()
def recommender(artifacts) -> Recommender:
    return Recommender.load(artifacts[0], artifacts[2])


@contextlib.asynccontextmanager
async def serving(app):
    """The app with its startup and shutdown run, and an httpx client talking to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


class Client:
    """A synchronous client over :func:`serving`, on its own event loop."""

    def __init__(self, app) -> None:
        self.loop = asyncio.new_event_loop()
        self.context = serving(app)
        self.http = self.loop.run_until_complete(self.context.__aenter__())

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.loop.run_until_complete(self.http.get(url, **kwargs))

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.loop.run_until_complete(self.http.post(url, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.context.__aexit__(None, None, None))
        self.loop.close()


@contextlib.contextmanager
def client_for(app):
    client = Client(app)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture()
def client(recommender) -> Client:
    with client_for(create_app(recommender, LIMITS)) as client:
        yield client


def direct(recommender: Recommender, k: int = 5, **features) -> list:
    [result] = recommender.recommend_queries([recommender.parse(features, k)])
    return result.keys


def test_recommend_single_and_batch(client, recommender):
    body = {"features": {"user_id": 3, "history": [1, 2]}, "k": 5}
    response = client.post("/v1/recommend", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["items"] == direct(recommender, user_id=3, history=[1, 2])
    assert len(answer["scores"]) == 5 and answer["scores"] == sorted(answer["scores"])[::-1]
    shortcut = client.post("/v1/recommend", json={"user": 3, "history": [1, 2], "k": 5}).json()
    assert shortcut == answer
    cold = client.post("/v1/recommend", json={"user": 3}).json()  # no history: empty
    assert cold["items"] == direct(recommender, 10, user_id=3, history=[])
    excluded = client.post("/v1/recommend", json={**body, "exclude": answer["items"][:2],
                                                  "popularity_penalty": 0.05}).json()
    assert not set(answer["items"][:2]) & set(excluded["items"]) and len(excluded["items"]) == 5
    batch = client.post("/v1/recommend/batch", json={"queries": [body, {"user": 4, "k": 2}]})
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert results[0] == answer and len(results[1]["items"]) == 2


def test_health_model_and_openapi(client, artifacts):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    response = client.get("/v1/model")
    info = response.json()
    assert info["index"]["corpus_size"] == 300 and info["index"]["kind"] == "exact"
    assert info["index"]["recall@100"] == 1.0 and info["index"]["popularity_penalty"]
    assert "torch" in info["model"]["versions"] and info["index"]["info"]["model_fingerprint"]
    assert info["model"]["history_features"] == ["history"] and info["limits"]["max_k"] == 50
    assert "faiss" in info["index"]["versions"] and info["reloads"] == 0
    # No server paths: neither the directories nor the items table the index was built from.
    assert str(artifacts[0].parent) not in response.text and '"/' not in response.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recommend", "/v1/recommend/batch", "/v1/model", "/healthz",
            "/readyz"} <= set(paths)
    assert "/v1/admin/reload" not in paths  # off unless the operator sets a token


BAD_REQUESTS = [
    ({"features": {"user_id": 1, "history": [], "age": 3}}, 422, ["body", "features", "age"]),
    ({"features": {"history": []}}, 422, ["body", "features", "user_id"]),
    ({"features": {"user_id": 1.5, "history": []}}, 422, ["body", "features", "user_id"]),
    ({"features": {"user_id": 1, "history": "1 2"}}, 422, ["body", "features", "history"]),
    ({"features": {"user_id": 1, "history": [1, None]}}, 422,
     ["body", "features", "history", 1]),
    ({"user": 1, "history": [1, None]}, 422, ["body", "history", 1]),
    ({"user": 1, "features": {"user_id": 1, "history": []}}, 422, ["body"]),
    ({}, 422, ["body"]),
    ({"user": 1, "k": 51}, 422, ["body", "k"]),
    ({"user": 1, "k": 0}, 422, ["body", "k"]),
    ({"user": 1, "k": "5"}, 422, ["body", "k"]),
    ({"user": 1, "popularity_penalty": "high"}, 422, ["body", "popularity_penalty"]),
    ({"user": 1, "exclude": [{"a": 1}]}, 422, ["body", "exclude", 0]),
    ({"user": 1, "surprise": True}, 422, ["body", "surprise"]),
    ([1, 2], 422, ["body"]),
    # Finite in float64 but not in float32, or scores that would overflow, or no float.
    ({"user": 1, "popularity_penalty": 1e39}, 422, ["body", "popularity_penalty"]),
    ({"user": 1, "popularity_penalty": 3e38}, 422, ["body", "popularity_penalty"]),
    ({"user": 1, "popularity_penalty": 10**400}, 422, ["body", "popularity_penalty"]),
    ({"features": {"user_id": 1, "history": [10**400]}}, 422,
     ["body", "features", "history", 0]),
    # A lone surrogate: valid JSON, but no UTF-8 form to hash or to answer with.
    ({"user": "\ud800"}, 422, ["body", "user"]),
    ({"user": 1, "history": [2, "\ud800"]}, 422, ["body", "history", 1]),
    ({"user": 1, "exclude": ["\ud800"]}, 422, ["body", "exclude", 0]),
    ({"features": {"user_id": "\ud800", "history": []}}, 422, ["body", "features", "user_id"]),
    ({"features": {"user_id": 1, "history": [], "\ud800": 1}}, 422,
     ["body", "features", "\\ud800"]),
]


def post_json(client: Client, url: str, body: object, **headers: str) -> httpx.Response:
    """POST ``body`` as JSON text with ASCII escapes, as any JSON encoder may send it (httpx's
    own encoding cannot carry a lone surrogate)."""
    return client.post(url, content=json.dumps(body),
                       headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("body, status, loc", BAD_REQUESTS)
def test_bad_requests_get_clear_errors(client, body, status, loc):
    response = post_json(client, "/v1/recommend", body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"][:len(loc)] == loc and detail[0]["msg"]  # the field, then the type


TEXT = st.text(st.characters(exclude_categories=()), max_size=6) | st.sampled_from(
    ["\ud800", "a\udfffb", "user_id", "history"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | TEXT
           | st.sampled_from([2 ** 63, -(2 ** 63) - 1, 10 ** 400, 1e39, 3e38]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=8)
QUERY = {"features": {"user_id": 3, "history": [1, 2]}, "k": 5, "exclude": [4],
         "exclude_history": True, "popularity_penalty": 0.01}
SHORTCUT = {"user": 3, "history": [1, 2], "k": 5}
FIELDS = [(), ("features",), ("features", "user_id"), ("features", "history"),
          ("features", "new"), ("k",), ("exclude",), ("exclude_history",),
          ("popularity_penalty",), ("new",), ("user",), ("history",)]


@st.composite
def requests(draw) -> tuple[str, object]:
    """``(url, body)``: a valid request with one field (or the whole body) replaced by an
    arbitrary JSON value."""
    url = draw(st.sampled_from(["/v1/recommend", "/v1/recommend/batch", "/v1/admin/reload"]))
    value = draw(JSON)
    if url == "/v1/admin/reload":
        return url, draw(st.sampled_from([value, {"model_dir": value}]))
    path = draw(st.sampled_from(FIELDS))
    query = json.loads(json.dumps(SHORTCUT if path[0:1] in [("user",), ("history",)] else QUERY))
    if path:
        *parents, last = path
        target = query
        for name in parents:
            target = target[name]
        target[last] = value
    else:
        query = value
    if url == "/v1/recommend/batch":
        return url, draw(st.sampled_from([{"queries": [query]}, {"queries": value}]))
    return url, query


def test_no_request_gets_a_server_error(artifacts, tmp_path, caplog):
    """Arbitrary JSON in every field of every endpoint gets an answer below 500 (an error in
    the app would be raised here by the in-process transport) and logs no traceback."""
    app = create_app(served_copy(artifacts, tmp_path), LIMITS, reload_token=TOKEN)
    with client_for(app) as client, caplog.at_level(logging.DEBUG):

        @settings(max_examples=300, deadline=None)
        @given(requests())
        def check(request: tuple[str, object]) -> None:
            url, body = request
            response = post_json(client, url, body, authorization=ADMIN["authorization"])
            assert response.status_code < 500, (body, response.text)

        check()
    assert "Traceback" not in caplog.text


def test_malformed_oversized_and_batch_limits(client):
    headers = {"content-type": "application/json"}
    malformed = client.post("/v1/recommend", content=b'{"user": 1,', headers=headers)
    assert malformed.status_code == 400 and malformed.json()["detail"][0]["type"] == "json_invalid"
    big = {"user": 1, "exclude": list(range(2000))}
    assert client.post("/v1/recommend", json=big).status_code == 413

    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    chunked = client.post("/v1/recommend", headers=headers, content=chunks())  # no length
    assert chunked.status_code == 413 and "limit of 4000 bytes" in chunked.text
    too_many = client.post("/v1/recommend/batch", json={"queries": [{"user": 1}] * 5})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == [
        "body", "queries"]
    empty = client.post("/v1/recommend/batch", json={"queries": []})
    assert empty.status_code == 422
    nested = client.post("/v1/recommend/batch", json={"queries": [{"user": 1}, {"k": 3}]})
    assert nested.status_code == 422 and nested.json()["detail"][0]["loc"] == [
        "body", "queries", 1]
    assert client.get("/v1/recommend").status_code == 405
    plain = client.post("/v1/recommend", content=b'{"user": 1}')  # no content-type
    assert plain.status_code == 415 and "application/json" in plain.text
    assert client.get("/healthz").status_code == 200  # and the service is still fine


def _body(i: int) -> dict:
    return {"user": i % 17, "history": [i % 7], "k": 5}


def _traffic(app, clients: int, during=None) -> tuple[list[tuple[int, int, list]], object]:
    """``clients`` concurrent clients, each sending recommendations back to back: 5 each,
    or with ``during``, until ``during(http)`` has finished and then 5 more. Returns each
    request's number, status and items, and what ``during`` returned."""

    async def run():
        async with serving(app) as http:
            finished = asyncio.Event()
            answers: list = []

            async def client(c: int) -> None:
                after, i = 0, c
                while after < 5:
                    response = await http.post("/v1/recommend", json=_body(i))
                    answers.append((i, response.status_code, response.json().get("items")))
                    after += during is None or finished.is_set()
                    i += clients

            async def watch():
                try:
                    return await during(http) if during else None
                finally:
                    finished.set()

            *_, result = await asyncio.gather(*(client(c) for c in range(clients)), watch())
            return answers, result

    return asyncio.run(run())


def test_concurrent_requests_are_micro_batched(recommender):
    sizes = []
    inner = recommender.recommend_queries

    def spy(queries):
        sizes.append(len(queries))
        return inner(queries)

    recommender.recommend_queries = spy
    app = create_app(recommender, Limits(max_wait_ms=5.0, max_micro_batch=32))
    answers, _ = _traffic(app, 40)
    assert [status for _, status, _ in answers] == [200] * 200
    assert sum(sizes) == 200 and max(sizes) <= 32 and len(sizes) < 100  # 40 clients, batched


def test_batches_keep_the_recommender_they_started_with(recommender, other):
    second = Recommender.load(*other)
    queries = [recommender.parse({"user_id": u, "history": []}, 3) for u in range(4)]

    async def run():
        batcher = MicroBatcher(64, 0.01)
        try:
            return await asyncio.gather(batcher.submit(recommender, queries[:2]),
                                        batcher.submit(second, queries[2:]))
        finally:
            batcher.close()

    first_answers, second_answers = asyncio.run(run())
    assert [a.keys for a in first_answers] == [
        r.keys for r in recommender.recommend_queries(queries[:2])]
    assert [a.keys for a in second_answers] == [
        r.keys for r in second.recommend_queries(queries[2:])]


def _features(i: int) -> dict:
    return {"user_id": i % 17, "history": [i % 7]}


def served_copy(artifacts, root: Path) -> Recommender:
    """A recommender loaded from copies of the model and index directories, which a test
    may then change on disk as an operator would."""
    model, _, index = artifacts
    return Recommender.load(shutil.copytree(model, root / "model"),
                            shutil.copytree(index, root / "index"))


def replace_model(target: Path, source: Path) -> None:
    for path in source.iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)


def replace_index(target: Path, source: Path) -> None:
    shutil.copytree(source, target.with_name("index.new"))
    shutil.rmtree(target)
    os.replace(target.with_name("index.new"), target)


def test_model_info_reads_the_complete_lines_of_a_metrics_log_being_written(artifacts,
                                                                            tmp_path):
    served = served_copy(artifacts, tmp_path)
    (Path(served.model_dir) / "metrics.jsonl").write_text(
        '{"step": 20, "loss": 4.5}\n{"event": "eval", "recall@10": 0.25}\n{"step": 40, "lo')
    with client_for(create_app(served)) as client:
        response = client.get("/v1/model")
    assert response.status_code == 200
    assert response.json()["model"]["metrics"] == {"train": {"step": 20, "loss": 4.5},
                                                   "eval": {"event": "eval", "recall@10": 0.25}}


def test_hot_swap_under_traffic_and_refused_reload(artifacts, other, tmp_path, caplog):
    served = served_copy(artifacts, tmp_path)
    model_dir, index_dir = Path(served.model_dir), Path(served.index_dir)
    app = create_app(served, LIMITS, reload_token=TOKEN)

    async def swap(http: httpx.AsyncClient) -> list:
        await asyncio.sleep(0.05)
        replace_model(model_dir, other[0])  # the index is still the old model's
        mismatched = await http.post("/v1/admin/reload", headers=ADMIN)
        replace_index(index_dir, other[1])
        good = await http.post("/v1/admin/reload", headers=ADMIN, json={})
        return [mismatched, good]

    old, new = Recommender.load(artifacts[0], artifacts[2]), Recommender.load(*other)
    with caplog.at_level(logging.WARNING, "twotower.serve"):
        answers, [mismatched, good] = _traffic(app, 20, swap)
    assert {status for _, status, _ in answers} == {200}  # not one failed during the swaps
    served_by = [(items == direct(old, **_features(i)), items == direct(new, **_features(i)))
                 for i, _, items in answers]
    assert all(by_old or by_new for by_old, by_new in served_by)
    assert any(by_old and not by_new for by_old, by_new in served_by)  # before the swap
    assert any(by_new and not by_old for by_old, by_new in served_by)  # and after it
    assert mismatched.status_code == 409 and "reload refused" in mismatched.text
    assert str(tmp_path) not in mismatched.text and "another model" not in mismatched.text
    assert "was built from another model" in caplog.text  # the reason, for the operator
    assert good.status_code == 200 and good.json() == {"status": "reloaded",
                                                       "corpus_size": 300, "reloads": 1}
    with client_for(app) as client:
        assert client.get("/v1/model").json()["reloads"] == 1
        answer = client.post("/v1/recommend", json={"user": 2, "history": [], "k": 5}).json()
        assert answer["items"] == direct(new, user_id=2, history=[])


def test_reload_follows_a_switched_symlink(artifacts, other, tmp_path):
    for version, (model, index) in (("v1", (artifacts[0], artifacts[2])), ("v2", other)):
        shutil.copytree(model, tmp_path / version)
        shutil.copytree(index, tmp_path / version / "index")
    (tmp_path / "current").symlink_to("v1")
    current = tmp_path / "current"
    app = create_app(Recommender.load(current, current / "index"), reload_token=TOKEN)
    query = {"user": 2, "history": [], "k": 5}
    with client_for(app) as client:
        before = client.post("/v1/recommend", json=query).json()
        (tmp_path / "next").symlink_to("v2")
        os.replace(tmp_path / "next", current)  # what `ln -sfn` does, atomically
        assert client.post("/v1/admin/reload", headers=ADMIN).status_code == 200
        after = client.post("/v1/recommend", json=query).json()
    assert after["items"] == direct(Recommender.load(*other), user_id=2, history=[])
    assert after["items"] != before["items"]


def test_reload_needs_the_token_and_a_json_body_naming_no_path(artifacts, other, tmp_path):
    served = served_copy(artifacts, tmp_path)
    with client_for(create_app(served, reload_token=TOKEN)) as client:
        assert client.post("/v1/admin/reload", json={}).status_code == 401
        wrong = client.post("/v1/admin/reload", json={},
                            headers={"authorization": f"Bearer {TOKEN[:-1]}x"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        plain = client.post("/v1/admin/reload", content=b"{}", headers={
            "authorization": ADMIN["authorization"], "content-type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.text
        named = client.post("/v1/admin/reload", headers=ADMIN,
                            json={"model_dir": str(other[0]), "index_dir": str(other[1])})
        assert named.status_code == 422 and named.json()["detail"][0]["loc"] == [
            "body", "model_dir"]
        assert client.get("/v1/model").json()["reloads"] == 0  # none of them reloaded
        assert client.post("/v1/admin/reload", headers=ADMIN).json()["reloads"] == 1


@pytest.mark.parametrize("breakage, logged", [
    ("no fingerprint", "records no model fingerprint"),
    ("not an index file", "is damaged")])
def test_refused_reload_tells_the_client_no_paths_or_file_contents(artifacts, tmp_path,
                                                                   caplog, breakage, logged):
    served = served_copy(artifacts, tmp_path / "served")
    index_dir = Path(served.index_dir)
    if breakage == "no fingerprint":  # would serve whatever vectors the index holds
        replace_index(index_dir, without_fingerprint(index_dir, tmp_path / "unsigned"))
    else:  # a readable file in the index's place: its first bytes must not be echoed
        (tmp_path / "secret").write_bytes(b"root:x:0:0:secret-line\n")
        (index_dir / "index.faiss").unlink()
        (index_dir / "index.faiss").symlink_to(tmp_path / "secret")
    with client_for(create_app(served, reload_token=TOKEN)) as client, \
            caplog.at_level(logging.WARNING, "twotower.serve"):
        response = client.post("/v1/admin/reload", headers=ADMIN)
        assert response.status_code == 409
        assert client.post("/v1/recommend", json={"user": 1}).status_code == 200
    for leak in (str(tmp_path), "root", "secret", "fingerprint"):
        assert leak not in response.text
    assert logged in caplog.text
    assert "Traceback" not in caplog.text


def test_unknown_host_headers_are_refused(recommender):
    with client_for(create_app(recommender, allowed_hosts=["localhost", "[::1]"])) as client:
        rebound = client.get("/readyz", headers={"host": "attacker.example:8000"})
        assert rebound.status_code == 400
        for host in ("localhost:8000", "[::1]:8000"):
            assert client.get("/readyz", headers={"host": host}).status_code == 200


def test_penalty_on_an_index_without_popularity_is_a_422(artifacts, tmp_path):
    model, items, _ = artifacts
    plain = index_items(model, items, popularity=False).save(tmp_path / "plain")
    with client_for(create_app(Recommender.load(model, plain))) as client:
        response = client.post("/v1/recommend", json={"user": 1, "popularity_penalty": 0.1})
        assert response.status_code == 422 and "no popularity column" in response.text
        assert client.post("/v1/recommend", json={"user": 1}).status_code == 200


def test_serve_refuses_a_short_reload_token(artifacts, tmp_path, capsys):
    from twotower.cli import main

    (tmp_path / "token").write_text("guessable")
    assert main(["serve", str(artifacts[0]), "--reload-token-file",
                 str(tmp_path / "token")]) == 2
    assert "holds 9 characters" in capsys.readouterr().err


def test_reload_is_off_unless_a_token_is_set(recommender):
    with client_for(create_app(recommender)) as client:
        assert client.post("/v1/admin/reload", headers=ADMIN).status_code == 404


@contextlib.contextmanager
def running(root: Path, options: str = ""):
    """``twotower.serve.serve`` on fresh artifacts in a subprocess, until ready; yields
    ``(process, url)``. ``options``: more keyword arguments of ``serve``, as source."""
    model, _, index = make_artifacts(root)
    port = free_port()
    code = ("from twotower.serve import Limits, serve; "
            f"serve({str(model)!r}, {str(index)!r}, port={port}, {options})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield server, url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_serve_binds_loopback_and_reloads_on_sighup(tmp_path):
    with running(tmp_path) as (server, url):
        assert httpx.get(f"{url}/v1/model").json()["reloads"] == 0
        server.send_signal(signal.SIGHUP)
        for _ in range(100):
            if httpx.get(f"{url}/v1/model").json()["reloads"] == 1:
                break
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/model").json()["reloads"] == 1
        answer = httpx.post(f"{url}/v1/recommend", json={"user": 1, "k": 3}).json()
        assert len(answer["items"]) == 3 and json.dumps(answer)
        rebound = httpx.get(f"{url}/readyz", headers={"host": "attacker.example"})
        assert rebound.status_code == 400


BODY = b'{"user": 1}'


def head(length: int) -> bytes:
    return (b"POST /v1/recommend HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: "
            b"application/json\r\ncontent-length: %d\r\n\r\n" % length)


@pytest.mark.slow
def test_requests_that_do_not_arrive_in_time_get_a_408_and_are_closed(tmp_path):
    with running(tmp_path, "limits=Limits(request_timeout_s=1.0)") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        # Half a body, half the headers, nothing at all: 20 connections of each.
        parts = [head(len(BODY)) + BODY[:6], head(len(BODY))[:30], b""] * 20
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in parts]
        started = time.monotonic()
        try:
            for client, part in zip(clients, parts, strict=True):
                client.sendall(part)
            for client in clients:
                client.settimeout(10)
                answer = b""
                while chunk := client.recv(4096):  # until the server closes it
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert 0.9 < time.monotonic() - started < 4
        finally:
            for client in clients:
                client.close()
        # A request that arrives in time, even in pieces, is answered as before.
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(head(len(BODY)) + BODY[:6])
            time.sleep(0.3)
            client.sendall(BODY[6:])
            assert client.recv(4096).startswith(b"HTTP/1.1 200 ")


def _answer_to(port: int, request: bytes) -> bytes:
    """Everything the server sends back on a connection carrying ``request``, until it closes
    the connection or is silent for a second."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(5)
        with contextlib.suppress(ConnectionError):  # refused before all of it was sent
            client.sendall(request)
        client.settimeout(1)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := client.recv(65536):
                answer += chunk
        return answer


@pytest.mark.slow
def test_oversized_headers_get_a_431_and_the_connection_is_closed(tmp_path):
    """httptools kept a header of any size in memory: 4 x 20 MB cost the server 77 MB."""
    with running(tmp_path, "limits=Limits(max_head_bytes=8192)") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        one_big = head(len(BODY)).replace(b"\r\n\r\n", b"\r\nx-a: " + b"a" * 2_000_000
                                          + b"\r\n\r\n") + BODY
        many = head(len(BODY)).replace(b"\r\n\r\n", b"\r\n" + b"x-b: bbbbbbbb\r\n" * 50_000
                                       + b"\r\n") + BODY
        for request in (one_big, many):
            answer = _answer_to(port, request)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert b"over the limit of 8192 bytes" in answer
        # Headers under the limit, and a body over it, are answered as before.
        fine = head(len(BODY)).replace(b"\r\n\r\n", b"\r\nx-a: " + b"a" * 6000
                                       + b"\r\n\r\n") + BODY
        assert _answer_to(port, fine).startswith(b"HTTP/1.1 200 ")
        body = b'{"user": 1, "history": [%s]}' % b",".join([b"1"] * 20_000)
        assert _answer_to(port, head(len(body)) + body).startswith(b"HTTP/1.1 200 ")
        # Two requests in one write: the second one's head is not counted with the first.
        assert _answer_to(port, (head(len(body)) + body) * 2).count(b"HTTP/1.1 200 ") == 2


def test_slow_answers_time_out_and_non_finite_embeddings_are_refused(recommender):
    import time as clock

    import torch

    inner, model_query = recommender.recommend_queries, recommender.model.query

    def slow(queries):
        clock.sleep(0.3)
        return inner(queries)

    recommender.recommend_queries = slow
    with client_for(create_app(recommender, Limits(timeout_s=0.05))) as client:
        response = client.post("/v1/recommend", json={"user": 1})
        assert response.status_code == 503 and "no answer within" in response.text
    recommender.recommend_queries = inner
    recommender.model.query = lambda batch: torch.full((len(batch["user_id"]), 8), torch.nan)
    try:
        with client_for(create_app(recommender)) as client:
            response = client.post("/v1/recommend", json={"user": 1})
            assert response.status_code == 422 and "non-finite" in response.text
    finally:
        recommender.model.query = model_query
