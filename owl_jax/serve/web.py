"""The web demo (gradio): multi-turn chat with uploaded images (and clips, for the video model), the
answer streamed as it is decoded, on the same batcher as the HTTP API.

The conversation is the released template: every image (then every clip) uploaded so far goes first,
each on a `Human: <image>` line, then the turns. Sampling controls: temperature (0: greedy), top-p and
the most new tokens; "Clear history" starts over.
"""
from __future__ import annotations

import dataclasses
import queue
from typing import Iterator

from owl_jax.inference.sampling import Sampling
from owl_jax.serve.batcher import Batcher, Request

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclasses.dataclass
class Conversation:
    """One browser session's chat: its media paths in upload order and its (question, answer) turns."""

    images: list[str] = dataclasses.field(default_factory=list)
    videos: list[str] = dataclasses.field(default_factory=list)
    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def messages(self, question: str) -> list[dict]:
        out = []
        for q, a in self.turns:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return out + [{"role": "user", "content": question}]


def answer_stream(batcher: Batcher, chat: Conversation, question: str, sampling: Sampling,
                  max_new_tokens: int) -> Iterator[str]:
    """The answer so far, after each piece the batcher decodes; the whole answer last."""
    owl = batcher.owl
    request = {"images": list(chat.images), "videos": list(chat.videos), "messages": chat.messages(question)}
    ids = owl.encode_request(request, dataclasses.replace(sampling, max_new_tokens=max_new_tokens), "the prompt")
    events: queue.Queue = queue.Queue()
    job = Request(ids, owl.images(chat.images), owl.clips(chat.videos), max_new_tokens, sampling,
                  on_text=lambda piece: events.put(("text", piece)),
                  on_done=lambda text, *_: events.put(("done", text)), on_error=lambda e: events.put(("error", e)))
    batcher.submit(job)
    text = ""
    try:
        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            text = value if kind == "done" else text + value
            yield text
            if kind == "done":
                return
    finally:  # the page closed or the user asked again: the row stops holding its batch
        job.cancelled = True


def build(batcher: Batcher, title: str = "mPLUG-Owl (owl_jax)"):
    """The gradio Blocks of the demo, on `batcher`."""
    import gradio as gr

    owl = batcher.owl
    file_types = ["image"] + (["video"] if owl.cfg.video else [])

    def respond(message: dict, history: list, chat: Conversation, temperature: float, top_p: float,
                max_new_tokens: int):
        chat = chat or Conversation()
        question = (message.get("text") or "").strip()
        for path in message.get("files") or []:
            name = path if isinstance(path, str) else path.get("path", "")
            (chat.videos if name.lower().endswith(VIDEO_SUFFIXES) else chat.images).append(name)
            history = history + [{"role": "user", "content": {"path": name}}]
        if not question:
            yield history, chat, gr.MultimodalTextbox(value=None)
            return
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        sampling = Sampling(do_sample=temperature > 0, temperature=temperature, top_p=top_p)
        try:
            for text in answer_stream(batcher, chat, question, sampling, int(max_new_tokens)):
                history[-1] = {"role": "assistant", "content": text}
                yield history, chat, gr.MultimodalTextbox(value=None)
        except (ValueError, OSError) as e:  # a prompt past the context, an unreadable file: said in the chat
            history[-1] = {"role": "assistant", "content": f"(error: {e})"}
            yield history, chat, gr.MultimodalTextbox(value=None)
            return
        chat.turns.append((question, history[-1]["content"]))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload images{' or videos' if owl.cfg.video else ''}, then ask.")
        chatbot = gr.Chatbot(label="chat", height=460, elem_id="chat")
        chat = gr.State(None)  # a Conversation, made by the first message of a session
        box = gr.MultimodalTextbox(file_types=file_types, file_count="multiple", show_label=False, elem_id="ask",
                                   placeholder="Ask about the images, or upload one")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
            max_new_tokens = gr.Slider(1, batcher.max_new_tokens, value=min(256, batcher.max_new_tokens), step=1,
                                       label="max new tokens")
        clear = gr.Button("Clear history", elem_id="clear")
        box.submit(respond, [box, chatbot, chat, temperature, top_p, max_new_tokens], [chatbot, chat, box])
        clear.click(lambda: ([], None, None), None, [chatbot, chat, box])
    return demo


def mount(app, batcher: Batcher):
    """The demo at "/" of the HTTP API's app (its /v1 routes keep their paths)."""
    import gradio as gr

    return gr.mount_gradio_app(app, build(batcher), path="/")
