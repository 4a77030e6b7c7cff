"""Tests for nd_utils.backends.openai_backend against a scripted fake OpenAI server on localhost."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nd_utils.errors import ConfigError, NdUtilsError
from nd_utils.backends.openai_backend import MissingApiKeyError, OpenAIChat

KEY = "sk-test-SECRET123"


def chat_body(text: str | None) -> dict:
    """A minimal chat.completion body whose single choice says `text`."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "gpt-test",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "test_error", "code": None}}


class _QuietServer(ThreadingHTTPServer):
    """A client that timed out closes its socket mid-answer; that is expected here, not news."""

    def handle_error(self, request, client_address) -> None:
        pass


class FakeOpenAI:
    """Serves POST /v1/chat/completions from a queue of (status, body, headers) responses.

    Each request's path, lower-cased headers and JSON body are recorded in `requests`.
    """

    def __init__(self) -> None:
        self.queue: deque = deque()
        self.default = (500, error_body("queue empty"), {})  # also what "persistent 500" uses
        self.requests: list[dict] = []
        self.delay = 0.0  # seconds to stall before answering, to provoke client timeouts
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append({"path": self.path,
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "json": json.loads(raw or b"null")})
                status, body, headers = fake.queue.popleft() if fake.queue else fake.default
                time.sleep(fake.delay)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:  # keep stderr clean for capsys checks
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def script(self, *responses) -> None:
        self.queue.extend(responses)


@pytest.fixture
def env(monkeypatch):
    """A hermetic environment: the fake key set, no proxies or ambient OpenAI settings."""
    for name in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_ADMIN_KEY",
                 "OPENAI_CUSTOM_HEADERS", "OPENAI_LOG", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return monkeypatch


@pytest.fixture
def server(env):
    fake = FakeOpenAI()
    thread = threading.Thread(target=fake.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def sleeps():
    return []


def make(server, sleeps, **kw) -> OpenAIChat:
    kw.setdefault("model", "gpt-test")
    kw.setdefault("timeout", 5.0)
    return OpenAIChat(base_url=server.base_url, sleep=sleeps.append, **kw)


def test_success_returns_text_and_sends_parameters(server, sleeps):
    server.script((200, chat_body("striped fur"), {}))
    llm = make(server, sleeps, max_tokens=17)
    assert llm.name == "openai" and llm.model_id == "openai:gpt-test"
    assert llm.complete("describe the neuron", temperature=0.3, seed=42) == "striped fur"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["json"]
    assert body["model"] == "gpt-test"
    assert body["messages"] == [{"role": "user", "content": "describe the neuron"}]
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.3, 42, 17)
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert sleeps == []


def test_none_content_is_empty_string(server, sleeps):
    server.script((200, chat_body(None), {}))
    assert make(server, sleeps).complete("x", temperature=0.0, seed=0) == ""


def test_base_url_falls_back_to_environment(server, sleeps, env):
    env.setenv("OPENAI_BASE_URL", server.base_url)
    server.script((200, chat_body("ok"), {}))
    llm = OpenAIChat("gpt-test", sleep=sleeps.append, timeout=5.0)
    assert llm.complete("x", temperature=0.0, seed=0) == "ok"
    assert len(server.requests) == 1


def test_429_then_500_then_200_retries_with_growing_delays(server, sleeps):
    server.script((429, error_body("slow down"), {"Retry-After": "0"}),
                  (500, error_body("boom"), {}),
                  (200, chat_body("dog ears"), {}))
    llm = make(server, sleeps, backoff=0.5)
    assert llm.complete("x", temperature=0.0, seed=1) == "dog ears"
    assert len(server.requests) == 3
    assert len(sleeps) == 2 and sleeps[0] < sleeps[1]
    assert sleeps == [0.0, 1.0]  # Retry-After: 0, then 0.5 * 2**1


def test_backoff_is_exponential_and_capped(server, sleeps):
    server.script(*[(503, error_body("busy"), {})] * 5, (200, chat_body("ok"), {}))
    llm = make(server, sleeps, backoff=1.0, max_backoff=5.0, max_retries=5)
    assert llm.complete("x", temperature=0.0, seed=0) == "ok"
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize("headers, expected", [
    ({"Retry-After": "7"}, 7.0),
    ({"Retry-After": "3600"}, 30.0),     # capped at max_backoff
    ({"retry-after-ms": "250"}, 0.25),
])
def test_retry_after_is_honoured(server, sleeps, headers, expected):
    server.script((429, error_body("rate limited"), headers), (200, chat_body("ok"), {}))
    assert make(server, sleeps).complete("x", temperature=0.0, seed=0) == "ok"
    assert sleeps == [expected]


def test_persistent_500_raises_after_max_retries_plus_one(server, sleeps):
    llm = make(server, sleeps, max_retries=3, backoff=0.0)
    with pytest.raises(NdUtilsError) as info:
        llm.complete("x", temperature=0.0, seed=0)
    assert len(server.requests) == 4 and len(sleeps) == 3
    assert "4 attempt" in str(info.value) and "HTTP 500" in str(info.value)


def test_max_retries_zero_makes_one_request(server, sleeps):
    with pytest.raises(NdUtilsError, match="1 attempt"):
        make(server, sleeps, max_retries=0).complete("x", temperature=0.0, seed=0)
    assert len(server.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(server, sleeps, status):
    server.script((status, error_body("bad thing happened"), {}), (200, chat_body("no"), {}))
    with pytest.raises(NdUtilsError) as info:
        make(server, sleeps).complete("x", temperature=0.0, seed=0)
    assert len(server.requests) == 1 and sleeps == []
    assert str(status) in str(info.value) and "bad thing happened" in str(info.value)


def test_connection_errors_are_retried(env, sleeps):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChat("gpt-test", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2,
                     sleep=sleeps.append, timeout=5.0)
    with pytest.raises(NdUtilsError, match="3 attempt.*APIConnectionError"):
        llm.complete("x", temperature=0.0, seed=0)
    assert sleeps == [1.0, 2.0]


def test_timeouts_are_retried(server, sleeps):
    server.delay = 1.0
    llm = make(server, sleeps, max_retries=1, timeout=0.2)
    with pytest.raises(NdUtilsError, match="2 attempt.*APITimeoutError"):
        llm.complete("x", temperature=0.0, seed=0)
    assert len(server.requests) == 2 and sleeps == [1.0]


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_key_raises_before_any_request(server, sleeps, env, value):
    if value is None:
        env.delenv("OPENAI_API_KEY")
    else:
        env.setenv("OPENAI_API_KEY", value)
    with pytest.raises(MissingApiKeyError, match="OPENAI_API_KEY") as info:
        make(server, sleeps)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, NdUtilsError)
    assert "export OPENAI_API_KEY=" in str(info.value) and "keywords" in str(info.value)
    assert server.requests == []


def test_custom_key_variable_is_named(server, sleeps, env):
    with pytest.raises(MissingApiKeyError, match="MY_LLM_KEY"):
        make(server, sleeps, api_key_env="MY_LLM_KEY")
    env.setenv("MY_LLM_KEY", KEY)
    server.script((200, chat_body("ok"), {}))
    assert make(server, sleeps, api_key_env="MY_LLM_KEY").complete(
        "x", temperature=0.0, seed=0) == "ok"


def _full_text(exc: BaseException) -> str:
    """Everything a traceback would print, including chained causes and contexts."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


def test_key_never_leaks(server, sleeps, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # includes the SDK's and HTTP client's debug loggers
    llm = make(server, sleeps, max_retries=1)
    texts = [repr(llm), str(llm), llm.model_id]

    # A server that echoes the rejected key back in its error message.
    server.script((401, error_body(f"Incorrect API key provided: {KEY}."), {}))
    with pytest.raises(NdUtilsError) as info:
        llm.complete("x", temperature=0.0, seed=0)
    assert "[redacted]" in str(info.value)
    texts.append(_full_text(info.value))

    # Retries exhausted on errors that also echo the key.
    server.script(*[(500, error_body(f"internal error for {KEY}"), {"Retry-After": "0"})] * 2)
    with pytest.raises(NdUtilsError) as info:
        llm.complete("x", temperature=0.0, seed=0)
    texts.append(_full_text(info.value))

    server.script((200, chat_body("ok"), {}))
    llm.complete("x", temperature=0.0, seed=0)

    # The key really was sent, so its absence below is not vacuous.
    assert all(r["headers"].get("authorization") == f"Bearer {KEY}" for r in server.requests)
    out = capsys.readouterr()
    texts += [out.out, out.err, caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    assert caplog.records, "expected retry warnings to be logged"
    for text in texts:
        assert KEY not in text


def test_answers_are_cached_replayed_and_keyless_on_disk(server, sleeps, tmp_path):
    """Through the answer cache: one request per distinct prompt; replay needs no server."""
    from nd_utils.backends.answer_cache import CachedLanguageModel, ReplayMissError
    from nd_utils.backends.prompt_templates import load_template

    tpl = load_template("simplify.v1")
    server.script((429, error_body("slow down"), {"Retry-After": "0"}),
                  (200, chat_body("red car"), {}))
    cache = tmp_path / "answers.jsonl"
    lm = CachedLanguageModel(make(server, sleeps), cache, temperature=0.3)
    assert lm.ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    assert lm.ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    assert len(server.requests) == 2 and lm.calls == 1 and lm.cache.hits == 1  # 429 + 200
    record = json.loads(cache.read_text())
    assert record["request"]["model"] == "openai:gpt-test" and record["request"]["seed"] == 0
    assert KEY not in cache.read_text()
    replay = CachedLanguageModel(make(server, sleeps), cache, temperature=0.3, mode="replay")
    assert replay.ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    with pytest.raises(ReplayMissError):
        replay.ask(tpl, {"caption": "a blue car"}, seed=0)
    assert len(server.requests) == 2  # replay never called the server


def test_replay_from_the_config_needs_no_key(server, env, tmp_path):
    """llm.mode=replay with llm.name=openai: no OPENAI_API_KEY, no request, same answers."""
    import nd_utils as nd
    from nd_utils.backends.configured import language_model_from_config
    from nd_utils.backends.answer_cache import ReplayMissError
    from nd_utils.backends.prompt_templates import load_template

    env.setenv("OPENAI_BASE_URL", server.base_url)
    tpl = load_template("simplify.v1")
    cfg = nd.load_config("paper", [f"data_dir={tmp_path}", "llm.model=gpt-test"])
    server.script((200, chat_body("red car"), {}))
    assert language_model_from_config(cfg).ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    env.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingApiKeyError, match="llm.mode=replay"):
        language_model_from_config(cfg)  # live without a key: still the clear error
    replay = language_model_from_config(nd.load_config(cfg, ["llm.mode=replay"]))
    assert replay.model_id == "openai:gpt-test"  # the id the live answer was cached under
    assert replay.ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    with pytest.raises(ReplayMissError, match="replay mode: no cached answer of openai:gpt-test"):
        replay.ask(tpl, {"caption": "a blue car"}, seed=0)
    assert len(server.requests) == 1
    with pytest.raises(MissingApiKeyError):  # a request without a key says why
        replay.backend.complete("x", temperature=0.0, seed=0)


@pytest.mark.parametrize("stages, fails", [(["08"], True), (["04"], True), (["01", "02"], False)])
def test_preflight_names_every_stage_that_asks_the_language_model(env, tmp_path, stages, fails):
    import nd_utils as nd
    from nd_utils.pipeline import preflight

    env.delenv("OPENAI_API_KEY")
    cfg = nd.load_config("paper", [f"data_dir={tmp_path}"])
    if fails:
        with pytest.raises(MissingApiKeyError, match=f"stage\\(s\\) {stages[0]} would fail"):
            preflight(cfg, stages)
    else:
        preflight(cfg, stages)
    preflight(nd.load_config(cfg, ["llm.mode=replay"]), stages)  # replay needs no key


def test_preflight_flags_stage_08_only_when_it_asks_the_language_model(env, tmp_path):
    """Offline probes: stage 08 judges the run's own labels, so it asks the language model only
    when stage 04's concepts are missing (it computes them then) or when it re-chooses labels."""
    import nd_utils as nd
    from nd_utils.pipeline import preflight

    env.delenv("OPENAI_API_KEY")
    cfg = nd.load_config("offline", [f"data_dir={tmp_path}", "llm.name=openai"])
    with pytest.raises(MissingApiKeyError,
                       match=r"stage\(s\) 08 would fail .*computes the missing stage 04"):
        preflight(cfg, ["08"])
    done = tmp_path / "artifacts" / "04_concepts" / "0123456789abcdef"
    done.mkdir(parents=True)
    (done / "manifest.json").write_text(json.dumps(
        {"key": done.name, "stage": "04_concepts", "files": {}}))
    preflight(cfg, ["08"])  # its concepts are stored: stage 08 never asks, no key needed
    with pytest.raises(MissingApiKeyError, match=r"stage\(s\) 04 would fail"):
        preflight(cfg, ["04", "08"])
    # labels chosen on the quality probe itself are not held out: 08 chooses them again
    rechoose = nd.load_config(cfg, ["probe.sets=[{name: imagenet-sample-1k}]"])
    with pytest.raises(MissingApiKeyError,
                       match=r"stage\(s\) 08 would fail .*labels again on its select part"):
        preflight(rechoose, ["08"])
    preflight(nd.load_config(rechoose, ["llm.mode=replay"]), ["08"])  # replay needs no key
