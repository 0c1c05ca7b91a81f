"""`POST /v1/chat/completions` in the OpenAI style, on a `Batcher` (FastAPI).

A request is untrusted input: everything in it is checked before it queues, and a bad one gets a 4xx
whose message names the field (`{"error": {"message", "type", "param"}}`); the server goes on.

Messages follow OpenAI's chat format. A user message's content is a string or a list of parts:
`{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}`
and, for the video model, `{"type": "video_url", "video_url": {"url": "data:video/...;base64,..."}}`
(the release's 4 frames). Only data URLs: the server fetches nothing. The prompt is the released
template: every image (then every clip) on a `Human: <image>` line of its own first, then the turns.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import re
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from owl_jax.inference.media import load_clip, load_image
from owl_jax.inference.sampling import Sampling
from owl_jax.serve.batcher import Batcher, Closed
from owl_jax.serve.batcher import Request as Job

# The request fields this server understands ("model" and "user" are taken as labels); any other is
# refused by name rather than silently ignored.
FIELDS = {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "n", "user"}
_DATA_URL = re.compile(r"data:(?P<kind>image|video)/[\w.+-]+;base64,(?P<data>.*)", re.S)
MAX_BODY_BYTES = 64 << 20  # a request with 8 large photos as base64 is well under this
MAX_IMAGE_PIXELS = 4096 * 4096  # checked from the header, before anything is decoded
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what browsers send; no format that runs programs


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _error(message: str, param: str | None, status: int) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def _number(body: dict, name: str, kind: type, lo: float, hi: float, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}={value}: expected {lo} to {hi}", name)
    return kind(value)


def _media(url: Any, kind: str, where: str, size: int) -> np.ndarray:
    """A data URL's image (float32 [S, S, 3]) or clip (float32 [f, S, S, 3]), CLIP-normalised."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None or match["kind"] != kind:
        raise BadRequest(f"{where}: expected a data URL (data:{kind}/...;base64,...); the server fetches nothing",
                         where)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: not valid base64", where) from None
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise BadRequest(f"{where}: {img.width} x {img.height} pixels, more than {MAX_IMAGE_PIXELS}",
                                     where)
                img.load()
                return load_image(img.convert("RGB"), size)
        from owl_jax.data.video import VideoError, read_clip

        try:
            return load_clip(read_clip(data, size=size, name=where), size)
        except VideoError as e:
            raise BadRequest(f"{e} ({e.reason})", where) from None
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on a bad file is the client's 400
        raise BadRequest(f"{where}: cannot decode the {kind} ({type(e).__name__}: {e})", where) from None


class ChatCompletions:
    """Turns request bodies into batcher jobs, and their answers into OpenAI responses."""

    def __init__(self, batcher: Batcher, model_name: str, max_media: int = 8):
        self.batcher, self.owl, self.model_name, self.max_media = batcher, batcher.owl, model_name, max_media

    def parse(self, body: Any) -> tuple[np.ndarray, list, list, int, Sampling, bool]:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r} (this server reads {sorted(FIELDS)})", unknown[0])
        if _number(body, "n", int, 1, 1, 1) != 1:
            raise BadRequest("n must be 1", "n")
        limit = self.batcher.max_new_tokens
        max_tokens = _number(body, "max_completion_tokens", int, 1, limit, None)
        max_tokens = _number(body, "max_tokens", int, 1, limit, max_tokens or min(256, limit))
        temperature = _number(body, "temperature", float, 0.0, 2.0, 1.0)
        sampling = Sampling(do_sample=temperature > 0, temperature=temperature,
                            top_p=_number(body, "top_p", float, 0.0, 1.0, 1.0),
                            top_k=_number(body, "top_k", int, 0, self.owl.cfg.llm.vocab_size, 0),
                            seed=_number(body, "seed", int, 0, 2**31 - 1, 0))
        seeded = body.get("seed") is not None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false", "stream")
        messages, images, clips = self._messages(body.get("messages"))
        # A text far past the context is refused before it is tokenised (no token is shorter than a byte's
        # worth of text by much: 16 characters a position is generous).
        chars, context = sum(len(m["content"]) for m in messages), self.owl.cfg.llm.max_position_embeddings
        if chars > 16 * context:
            raise BadRequest(f"messages: {chars} characters cannot fit the model's {context} positions", "messages")
        try:  # the turns in order, no typed media tags, the prompt and answer within the context
            ids = self.owl.encode_request({"images": images, "videos": clips, "messages": messages},
                                          dataclasses.replace(sampling, max_new_tokens=max_tokens), "the prompt")
        except ValueError as e:  # UserError included
            raise BadRequest(f"messages: {e}", "messages") from None
        return ids, images, clips, max_tokens, sampling, stream, seeded

    def _messages(self, messages: Any) -> tuple[list[dict], list, list]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        out, images, clips = [], [], []
        size = self.owl.cfg.vision.image_size
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise BadRequest(f"{where}: expected {{'role': 'system' | 'user' | 'assistant', 'content': ...}}",
                                 where)
            content = m.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise BadRequest(f"{where}.content: expected a string or a list of parts", f"{where}.content")
            texts = []
            for j, part in enumerate(parts):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind in ("image_url", "video_url") and m["role"] == "user":
                    if kind == "video_url" and not self.owl.cfg.video:
                        raise BadRequest(f"{at}: videos need the video model; this one reads images", at)
                    if len(images) + len(clips) >= self.max_media:
                        raise BadRequest(f"{at}: more than {self.max_media} images and videos in one request", at)
                    url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else None
                    media = _media(url, kind.split("_")[0], f"{at}.{kind}.url", size)
                    (images if kind == "image_url" else clips).append(media)
                else:
                    raise BadRequest(f"{at}: expected a text part" + (", or an image_url part" if m["role"] == "user"
                                                                       else ""), at)
            out.append({"role": m["role"], "content": "\n".join(texts)})
        return out, images, clips

    async def __call__(self, request: Request):
        try:
            raw = await _read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise BadRequest(f"the body is not valid JSON ({type(e).__name__}: {e})") from None
            ids, images, clips, max_tokens, sampling, stream, seeded = await asyncio.to_thread(self.parse, body)
        except BadRequest as e:
            return _error(str(e), e.param, e.status)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda *event: loop.call_soon_threadsafe(events.put_nowait, event)
        job = Job(ids, images, clips, max_tokens, sampling, on_text=lambda piece: put("text", piece),
                  on_done=lambda text, reason, n: put("done", text, reason, n), on_error=lambda e: put("error", e),
                  seeded=seeded)
        try:
            self.batcher.submit(job)
        except Closed as e:
            return _error(str(e), None, 503)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if stream:
            return StreamingResponse(self._events(events, reply, job), media_type="text/event-stream")
        try:
            while (event := await events.get())[0] == "text":
                pass
        finally:  # the client gone (the handler cancelled): its row stops taking the batch's time
            job.cancelled = True
        if event[0] == "error":
            return _error(f"decoding failed: {event[1]}", None, 500)
        _, text, reason, completion = event
        return {**reply, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

    async def _events(self, events: asyncio.Queue, reply: dict, job: Job):
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**reply, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield chunk({"content": event[1]})
                elif event[0] == "done":
                    yield chunk({}, event[2])
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': f'decoding failed: {event[1]}'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream
            job.cancelled = True


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES before more of it is read."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is over {MAX_BODY_BYTES >> 20} MiB", None, 413)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES >> 20} MiB", None, 413)
        parts.append(part)
    return b"".join(parts)


def create_app(batcher: Batcher, model_name: str = "owl_jax", max_media: int = 8) -> FastAPI:
    """The HTTP API on `batcher`: POST /v1/chat/completions, GET /v1/models. Shutting the app down
    (uvicorn on SIGTERM, after its in-flight requests) closes the batcher."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="owl_jax", lifespan=lifespan)
    completions = ChatCompletions(batcher, model_name, max_media)
    app.add_api_route("/v1/chat/completions", completions.__call__, methods=["POST"])

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "owl_jax"}]}

    return app
