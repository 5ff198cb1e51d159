"""The Gradio front end: a multimodal ChatInterface over `Engine`. Each yield is the whole assistant turn so
far: a collapsible "Thinking" message, the answer, tool calls as blocks and a statistics line."""

import json
import queue
import time
from pathlib import Path

import gradio as gr

from .engine import DEFAULT_MODEL, Engine, Settings, find_models, stats_line

ERROR_PREFIX = "⚠️ Error: "
STATS_TITLE = "Stats: "
TOOL_TITLE = "Tool call: "
WAIT_SECONDS = 3600  # an upper bound on one request (queue wait + generation)
EXAMPLE_TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])


def _path_of(part):
    if isinstance(part, str):
        return None
    if isinstance(part, dict):
        if part.get("type") == "file" or "file" in part:
            inner = part.get("file")
            return inner.get("path") if isinstance(inner, dict) else inner
        return part.get("path")
    return getattr(part, "path", None) or getattr(getattr(part, "file", None), "path", None)


def _text_of(part) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text":
        return part.get("text", "")
    return ""


def _split(content):
    """(text, [file paths]) of a message content in any of the shapes Gradio hands over."""
    if isinstance(content, (str, dict)) or content is None:
        content = [content] if content is not None else []
    text, files = [], []
    for part in content:
        if isinstance(part, (list, tuple)):  # the older (path, alt) tuple form
            part = {"path": part[0]} if part else ""
        path = _path_of(part)
        if path:
            files.append(str(path))
        else:
            text.append(_text_of(part))
    return "".join(text), files


def _sort_media(files):
    from .engine import UserError, media_kind

    images, videos = [], []
    for path in files:
        try:
            (images if media_kind(path) == "image" else videos).append(path)
        except UserError:
            images.append(path)  # rejected, visibly, when the turn runs
    return images, videos


def normalise_history(history) -> list:
    """Gradio history (web UI or API shape) -> completed turns {"text", "images", "videos", "answer"}.
    Thoughts, statistics and tool-call blocks (messages with a metadata title) stay out of the prompt; a
    turn that ended in an error is dropped with its error."""
    turns, user, answer = [], None, None

    def close():
        nonlocal user, answer
        if user is not None and answer is not None and not answer.startswith(ERROR_PREFIX):
            images, videos = _sort_media(user[1])
            turns.append({"text": user[0], "images": images, "videos": videos, "answer": answer})
        user, answer = None, None

    for message in history or []:
        message = message if isinstance(message, dict) else getattr(message, "__dict__", {})
        role, content = message.get("role"), message.get("content")
        if role == "user":
            if answer is not None:
                close()
            text, files = _split(content)
            user = (user[0] + text, user[1] + files) if user else (text, files)
        elif role == "assistant":
            if (message.get("metadata") or {}).get("title"):
                answer = answer if answer is not None else ""
                continue
            text, _ = _split(content)
            answer = (answer or "") + text
    close()
    return turns


def render(update) -> list:
    out = []
    if update.thinking.strip():  # an empty <think></think> block shows no panel
        meta = {"title": "Thinking", "status": "pending" if update.thinking_seconds is None else "done"}
        if update.thinking_seconds is not None:
            meta["duration"] = round(update.thinking_seconds, 2)
        out.append(gr.ChatMessage(update.thinking, metadata=meta))
    if update.answer:
        out.append(gr.ChatMessage(update.answer))
    for call in update.tool_calls:
        block = "```json\n" + json.dumps(call.get("arguments", {}), indent=2, ensure_ascii=False) + "\n```"
        out.append(gr.ChatMessage(block, metadata={"title": TOOL_TITLE + str(call.get("name"))}))
    if update.stats:
        out.append(gr.ChatMessage("", metadata={"title": STATS_TITLE + stats_line(update.stats), "status": "done"}))
    return out


def make_respond(engine: Engine):
    def respond(message, history, model, system_prompt, thinking, temperature, top_p, top_k, max_tokens,
                expert_cache_gb, tools):
        if isinstance(message, str):
            message = {"text": message, "files": []}
        text = (message or {}).get("text") or ""
        files = [str(_path_of(f) or f) for f in (message or {}).get("files") or []]
        images, videos = _sort_media(files)
        settings = Settings(model=model or DEFAULT_MODEL, system=system_prompt or "", enable_thinking=bool(thinking),
                            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                            max_tokens=int(max_tokens), expert_cache_gb=float(expert_cache_gb or 0),
                            tools=tools or "")
        job = engine.submit({"text": text, "images": images, "videos": videos}, normalise_history(history),
                            settings)
        deadline = time.monotonic() + WAIT_SECONDS
        last = None
        try:
            while time.monotonic() < deadline:
                try:
                    update = job.updates.get(timeout=0.25)
                except queue.Empty:
                    ahead = engine.ahead_of(job)
                    if last is None and ahead:
                        yield gr.ChatMessage(f"⏳ Busy: another generation is running ({ahead} ahead of this "
                                             f"one). Your message is queued and starts when it finishes.",
                                             metadata={"title": "Waiting", "status": "pending"})
                    continue
                if update.error:
                    yield ERROR_PREFIX + update.error
                    return
                if update.status == "loading":
                    yield gr.ChatMessage(update.answer, metadata={"title": "Loading model", "status": "pending"})
                    continue
                if update.done and last is not None and update.stats is None:
                    return
                last = update
                yield render(update)
                if update.done:
                    return
            yield ERROR_PREFIX + "timed out"
        finally:
            job.cancelled.set()  # Stop (or a closed tab): the worker stops at its next token

    return respond


def model_choices(models_dir) -> list:
    return [("Default model (tiny, trained on a world of coloured shapes)", DEFAULT_MODEL)] + \
        [(Path(p).name, p) for p in find_models(models_dir)]


def build_app(engine: Engine | None = None, models_dir=None, max_tokens: int = 512) -> gr.ChatInterface:
    """The chat app; `max_tokens` is the Max new tokens setting's starting value."""
    engine = engine or Engine()
    textbox = gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple", stop_btn=True,
                                   placeholder="Ask anything; attach images or videos", sources=["upload"])
    inputs = [
        gr.Dropdown(model_choices(models_dir), value=DEFAULT_MODEL, label="Model", allow_custom_value=True,
                    info="Converted checkpoints found in the models folder, or type a checkpoint path"),
        # Empty by default: the default model never saw a system turn (besides tool declarations) in training.
        gr.Textbox("", label="System prompt", lines=2, placeholder="none"),
        gr.Checkbox(True, label="Thinking"),
        gr.Slider(0, 2, 0.7, step=0.05, label="Temperature"),
        gr.Slider(0, 1, 0.95, step=0.01, label="Top-p"),
        gr.Slider(0, 200, 20, step=1, label="Top-k", info="0 turns it off"),
        gr.Slider(1, 8192, max_tokens, step=1, label="Max new tokens"),
        gr.Slider(0, 64, 0, step=0.5, label="Expert cache (GB)", info="MoE models: stream the experts through "
                  "a cache of this size; 0 loads them all"),
        gr.Code(None, language="json", label="Tools (JSON list of function schemas; empty for none)"),
    ]
    demo = gr.ChatInterface(
        make_respond(engine), multimodal=True, textbox=textbox, additional_inputs=inputs,
        additional_inputs_accordion="Settings",
        chatbot=gr.Chatbot(label="Qwen 3.5", height="68vh", buttons=["copy"]),
        title="Qwen 3.5 in MLX", api_name="chat", fill_height=True,
        description="Images and videos stay in the conversation. Thinking shows in its own box; statistics "
                    "follow each answer. One generation runs at a time; others wait in line.",
    )
    demo.engine = engine
    demo.example_tools = EXAMPLE_TOOLS
    return demo


def launch(model=None, models_dir=None, host="127.0.0.1", port=None, **kwargs):
    engine = Engine(default_model=model)
    engine.preload()
    demo = build_app(engine, models_dir)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo.launch(server_name=host, server_port=port, footer_links=["api"], **kwargs)


def main(argv=None):
    """`python -m app` / `mlx-qwen35 app`: serve the chat on 127.0.0.1 with the default model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app", description=main.__doc__)
    parser.add_argument("--model", help="checkpoint folder for the default entry (default: the shipped model)")
    parser.add_argument("--models-dir", default=str(Path.home() / ".cache" / "mlx-qwen35"),
                        help="folder whose checkpoint subfolders fill the model dropdown (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    args = parser.parse_args(argv)
    launch(model=args.model, models_dir=args.models_dir, host=args.host, port=args.port)
