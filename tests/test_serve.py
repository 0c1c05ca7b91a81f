"""The HTTP API (owl_jax/serve): the official openai client, streamed and not; every bad request of
the issue answered with a 4xx naming its field while the server goes on; 64 concurrent requests
batched, none lost, each answered as alone, no compilation once warm; SIGTERM answers what is in
flight and exits 0. Loopback only."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import QUESTIONS, REPO, free_port, subprocess_env


def png_data_url(seed: int, size=(40, 30)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": url}} for url in images]}


def decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


class Server:
    """uvicorn serving the app in a thread of this process, on a free loopback port."""

    def __init__(self, owl, **batcher_kwargs):
        import uvicorn

        from owl_jax.serve.batcher import Batcher
        from owl_jax.serve.openai_api import create_app

        self.batcher = Batcher(owl, **{"max_batch": 8, "max_new_tokens": 32, "wait_s": 0.02, **batcher_kwargs})
        self.port = free_port()
        config = uvicorn.Config(create_app(self.batcher, "owl", max_media=2), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, body, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(owl):
    s = Server(owl)
    yield s
    s.stop()


def test_the_openai_client_streamed_and_not(server, owl):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    image = png_data_url(0)
    messages = [user(QUESTIONS[0], image)]
    alone = owl.chat(images=[decoded(image)], messages=QUESTIONS[0], max_new_tokens=12)
    # temperature 0: greedy (OpenAI's default, 1, samples)
    reply = client.chat.completions.create(model="owl", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == alone and reply.model == "owl"
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="owl", messages=messages, max_tokens=12, temperature=0,
                                                stream=True):
        pieces += [chunk.choices[0].delta.content or ""]
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == alone and finish == reply.choices[0].finish_reason
    # multi-turn with a system prompt, no image
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[1]},
             {"role": "assistant", "content": "Red."}, {"role": "user", "content": QUESTIONS[2]}]
    reply = client.chat.completions.create(model="owl", messages=turns, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == owl.chat(messages=turns, max_new_tokens=8)


@pytest.mark.parametrize("case", ["malformed_json", "undecodable_image", "too_many_images", "prompt_too_long",
                                  "unknown_field", "remote_image", "bad_number"])
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(server, case):
    good = {"model": "owl", "messages": [user(QUESTIONS[0])], "max_tokens": 4}
    bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        b"\x89PNG\r\n\x1a\n not really").decode()}}
    requests = {
        "malformed_json": (None, b'{"model": "owl", "messages": [', None, "not valid JSON"),
        "undecodable_image": ({**good, "messages": [{"role": "user", "content": [bad_image]}]}, None,
                              "messages[0].content[0].image_url.url", "cannot decode the image"),
        "too_many_images": ({**good, "messages": [user("three", *[png_data_url(i) for i in range(3)])]}, None,
                            "messages[0].content[3]", "more than 2 images and videos"),
        "prompt_too_long": ({**good, "messages": [user("word " * 400)]}, None, "messages",
                            "max_position_embeddings"),
        "unknown_field": ({**good, "frequency_penalty": 0.5}, None, "frequency_penalty", "unknown field"),
        "remote_image": ({**good, "messages": [user("x", "http://example.com/a.png")]}, None,
                         "messages[0].content[1].image_url.url", "the server fetches nothing"),
        "bad_number": ({**good, "temperature": "hot"}, None, "temperature", "must be a number"),
    }
    body, raw, param, message = requests[case]
    status, reply = server.post(body, raw)
    assert status == 400, reply
    assert reply["error"]["param"] == param and message in reply["error"]["message"], reply
    status, reply = server.post(good)
    assert status == 200 and reply["choices"][0]["message"]["content"] is not None


def test_64_concurrent_requests_are_batched_and_each_answered_as_alone(server, owl):
    """64 greedy requests at once (16 distinct prompts, with 0 or 1 image): none lost, every answer the
    one its prompt gets alone, fewer batches than requests, and no compilation after the warm-up."""
    from owl_jax.inference.engine import decode, prefill

    prompts = [(QUESTIONS[i % 4], png_data_url(i) if i % 2 else None, 4 + i % 3 * 4) for i in range(16)]
    alone = {i: owl.chat(images=[decoded(url)] if url else None, messages=q, max_new_tokens=n)
             for i, (q, url, n) in enumerate(prompts)}

    def ask(i):
        q, url, n = prompts[i % 16]
        return server.post({"model": "owl", "messages": [user(q, *([url] if url else []))], "max_tokens": n,
                            "temperature": 0})

    for i in range(16):  # warm: every prompt bucket and image bucket these use
        ask(i)
    compiled = (prefill._cache_size(), decode._cache_size())
    batches_before = server.batcher.batches
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(64))
    for i, (status, reply) in results.items():
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == alone[i % 16], i
    assert server.batcher.batches - batches_before < 64 / 2  # requests shared batches
    assert (prefill._cache_size(), decode._cache_size()) == compiled


def test_sigterm_answers_the_request_in_flight_and_exits_0(owl_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen([sys.executable, "-m", "owl_jax.serve", "--checkpoint", owl_dir, "--port", str(port),
                             "--max_new_tokens", "48"], cwd=REPO, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the model loads and warms up before the port opens
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.2)
        body = {"model": "owl", "messages": [user(QUESTIONS[3])], "max_tokens": 48, "stream": True}
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as stream:
            first = stream.readline()
            assert first.startswith(b"data: ")
            os.kill(proc.pid, signal.SIGTERM)  # the answer is still being decoded or sent
            rest = stream.read().decode()
        events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # and nothing new is taken
            urllib.request.urlopen(url + "/v1/models", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_load_benchmark_smoke():
    """bench/serve_load.py --quick: both ways measured through the real server, answers equal."""
    import re

    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "serve_load.py"), "--quick"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "answers equal one at a time: 8/8"
    assert re.fullmatch(r"concurrent/one at a time requests/s = \d+\.\d\dx", lines[-1]), lines[-1]
    for way in ("one at a time", "concurrent"):
        assert any(re.fullmatch(rf"{way}: [\d.]+ requests/s, [\d.]+ tokens/s, latency p50 \d+ ms, p99 \d+ ms", line)
                   for line in lines), out.stdout


def test_a_prompt_that_fits_with_its_own_max_tokens_is_answered(server, owl):
    """The context check is each request's own: a long prompt with a short answer fits even where
    the server's largest max_tokens would not, and its batch-mates are not failed by it."""
    context = owl.cfg.llm.max_position_embeddings
    words = next(w for w in ("the circle " * n for n in range(1, 200))
                 if len(owl.encode(owl.prompt_text(0, w))) + 4 > context - 8)
    ids = owl.encode(owl.prompt_text(0, words))
    assert len(ids) + 4 <= context < len(ids) + server.batcher.max_new_tokens, len(ids)
    results = {}
    bodies = {"long": {"model": "owl", "messages": [user(words)], "max_tokens": 4, "temperature": 0},
              "short": {"model": "owl", "messages": [user(QUESTIONS[1])], "max_tokens": 8, "temperature": 0}}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, server.post(bodies[k]))) for k in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["long"][0] == 200 and results["short"][0] == 200, results
    assert results["long"][1]["choices"][0]["message"]["content"] == owl.chat(messages=words, max_new_tokens=4)


def test_oversized_images_and_bodies_are_refused_before_decoding(server):
    big = Image.new("RGB", (5000, 4000))  # 20 M pixels: refused from its header
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, reply = server.post({"model": "owl", "messages": [user("what?", url)], "max_tokens": 4})
    assert status == 400 and "5000 x 4000 pixels" in reply["error"]["message"], reply
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")  # announces 65 MiB and sends none of it
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(65 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over 64 MiB" in json.loads(response.read())["error"]["message"]
    conn.close()
