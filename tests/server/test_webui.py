"""The chat page's serving: HTML for browsers, the plain answer for API clients, open static files."""

from __future__ import annotations

from fastapi.testclient import TestClient

import engine  # noqa: F401  (BLAS preload before anything imports mlx)
from tests.server.fake_engine import FakeEngine, make_app

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def test_root_serves_page_to_browsers_and_text_to_clients():
    with TestClient(make_app(FakeEngine())) as c:
        page = c.get("/", headers=HTML)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="model"' in page.text and "/ui/chat.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
        plain = c.get("/")
        assert plain.status_code == 200 and plain.text == "Ollama is running"
        assert c.get("/", headers={"Accept": "application/json"}).text == "Ollama is running"
        assert c.head("/").status_code == 200


def test_assets_served_and_unknown_ones_404():
    with TestClient(make_app(FakeEngine())) as c:
        for name, kind in (("chat.js", "text/javascript"), ("markdown.js", "text/javascript")):
            r = c.get(f"/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert c.get("/ui/chat.css").headers["content-type"].startswith("text/css")
        r = c.get("/ui/../app.py")
        assert r.status_code == 404
        r = c.get("/ui/index.html.bak")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_page_is_open_but_the_api_needs_a_key():
    with TestClient(make_app(FakeEngine(), api_keys=["k1"])) as c:
        assert c.get("/", headers=HTML).status_code == 200
        assert c.get("/ui/chat.js").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "nope"}).status_code == 401
