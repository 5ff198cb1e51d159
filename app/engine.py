"""The model side of the app: one worker thread owns the model (MLX arrays stay on one thread, and only one
generation runs at a time for the UI and the API alike), takes jobs in arrival order, and streams each turn
back as `Update`s. Gradio only sees plain data."""

import gc
import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"}
DEFAULT_MODEL = "default"  # the shipped default model (docs/default-model.md)


class UserError(ValueError):
    """A problem with the request that the chat shows as an error message."""


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    system: str = ""
    enable_thinking: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 20
    max_tokens: int = 512
    expert_cache_gb: float = 0.0  # 0: load every expert (MoE models only)
    tools: str = ""  # a JSON list of tool schemas, or empty


@dataclass
class Update:
    """The assistant turn so far; `done` on the last one. `waiting` > 0: jobs ahead of this one."""
    thinking: str = ""
    thinking_seconds: float | None = None  # set once thinking has ended
    answer: str = ""
    tool_calls: list = field(default_factory=list)
    stats: dict | None = None
    error: str | None = None
    status: str = ""  # "loading", "waiting" or ""
    waiting: int = 0
    done: bool = False


@dataclass
class Job:
    turn: dict  # {"text", "images", "videos"}
    history: list  # earlier turns: [{"text", "images", "videos", "answer"}]
    settings: Settings
    id: int = 0
    updates: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def media_kind(path) -> str:
    suffix = Path(str(path)).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise UserError(f"unsupported file type {suffix or '(none)'!r} for {Path(str(path)).name}: attach images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}) or videos ({', '.join(sorted(VIDEO_SUFFIXES))})")


def content_parts(turn: dict):
    """A turn as Chat content: the media first (in the order given), then the text."""
    parts = [{"type": "image", "image": p} for p in turn["images"]] + \
        [{"type": "video", "video": p} for p in turn["videos"]]
    if not parts:
        return turn["text"]
    return parts + [{"type": "text", "text": turn["text"]}]


def parse_tools(text: str):
    from mlx_qwen35.generation.parsing import tool_schemas

    try:
        return tool_schemas(text)
    except ValueError as error:
        raise UserError(f"the tools setting: {error}") from None


def find_models(folder) -> list[str]:
    """Checkpoint folders (holding a config.json) directly inside `folder`, sorted."""
    folder = Path(folder).expanduser() if folder else None
    if not folder or not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if (p / "config.json").is_file())


def stats_line(stats: dict) -> str:
    parts = [f"TTFT {stats['ttft']:.2f} s", f"prefill {stats['prefill_tps']:.1f} tok/s",
             f"decode {stats['decode_tps']:.1f} tok/s", f"peak memory {stats['peak_memory_gb']:.2f} GB",
             f"{stats['prompt_tokens']} prompt tokens ({stats['prompt_tokens_processed']} processed)",
             f"{stats['generation_tokens']} generated"]
    if stats.get("expert_hit_rate") is not None:
        parts.append(f"expert cache hit rate {100 * stats['expert_hit_rate']:.1f}%")
    if stats.get("stopped"):
        parts.append("stopped")
    return " · ".join(parts)


class Engine:
    """Owns the model and one conversation. `submit` queues a turn; read its `updates` until `done`.
    `chat_factory(model, processor, **kwargs)` builds the conversation object (mlx_qwen35.Chat)."""

    def __init__(self, default_model=None, chat_factory=None, loader=None):
        self._default_model = default_model
        self._chat_factory = chat_factory
        self._loader = loader
        self._jobs = queue.Queue()
        self._ids = itertools.count(1)
        self._pending = []  # job ids submitted and not finished, in order
        self._pending_lock = threading.Lock()
        self.model = self.processor = None
        self.model_key = None  # (path, expert_cache_gb) of the loaded model
        self.chat = None
        self.chat_key = None  # (system, tools, thinking) the Chat was built with
        self.turns = []  # the turns (with answers) the Chat holds, in the app's normalised form
        self.last_stats = None
        self.generations = 0
        self._thread = threading.Thread(target=self._work, name="mlx-qwen35-engine", daemon=True)
        self._thread.start()

    # ---- called from Gradio's threads -------------------------------------------------------------------
    def submit(self, turn: dict, history: list, settings: Settings) -> Job:
        job = Job(turn, history, settings, id=next(self._ids))
        with self._pending_lock:
            self._pending.append(job.id)
        self._jobs.put(job)
        return job

    def ahead_of(self, job: Job) -> int:
        with self._pending_lock:
            return self._pending.index(job.id) if job.id in self._pending else 0

    def busy(self) -> bool:
        with self._pending_lock:
            return bool(self._pending)

    def preload(self, settings: Settings | None = None):
        """Load the model in the background (the first answer then starts sooner)."""
        self._jobs.put(("preload", settings or Settings()))

    def default_model_path(self) -> Path:
        if self._default_model is not None:
            return Path(self._default_model)
        from mlx_qwen35.demo import ensure_random_checkpoint
        from mlx_qwen35.loading import default_model_path

        try:
            return default_model_path()
        except FileNotFoundError:  # not built yet: the tiny random checkpoint shows the app working
            return ensure_random_checkpoint()

    # ---- the worker thread ------------------------------------------------------------------------------
    def _work(self):
        while True:
            job = self._jobs.get()
            if isinstance(job, tuple):
                try:
                    self._ensure_model(job[1])
                except Exception:  # reported again, visibly, on the first request
                    pass
                continue
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            except UserError as error:
                job.updates.put(Update(error=str(error), done=True))
            except Exception as error:  # keep serving: show it in the chat
                job.updates.put(Update(error=f"{type(error).__name__}: {error}", done=True))
            finally:
                with self._pending_lock:
                    self._pending.remove(job.id)
                job.updates.put(Update(done=True))

    def _resolve(self, settings: Settings) -> Path:
        if settings.model in (None, "", DEFAULT_MODEL):
            try:
                return self.default_model_path()
            except FileNotFoundError as error:
                raise UserError(str(error)) from None
        return Path(settings.model).expanduser()

    def _ensure_model(self, settings: Settings, job: Job | None = None):
        from mlx_qwen35.config import ModelConfig

        path = self._resolve(settings)
        try:
            config = ModelConfig.from_path(path)
        except FileNotFoundError as error:
            raise UserError(f"{path} is not a Qwen 3.5 checkpoint folder ({error})") from None
        except ValueError as error:
            raise UserError(f"{path} is not a Qwen 3.5 checkpoint: {error}") from None
        cache_gb = settings.expert_cache_gb if config.text_config.is_moe and settings.expert_cache_gb > 0 else None
        key = (str(path), cache_gb)
        if key == self.model_key:
            return
        if job is not None:
            job.updates.put(Update(status="loading", answer=f"Loading {path.name}…"))
        self.unload()
        load = self._loader or _load
        try:
            self.model, self.processor = load(path, expert_cache_gb=cache_gb)
        except Exception as error:
            raise UserError(f"cannot load {path}: {error}") from None
        if self.processor is None:
            self.unload()
            raise UserError(f"{path} has no tokenizer files; the app needs a checkpoint with a tokenizer")
        self.model_key = key

    def unload(self):
        cache = getattr(self.model, "expert_cache", None)
        if cache is not None and hasattr(cache, "close"):
            cache.close()
        self.model = self.processor = self.chat = None
        self.model_key = self.chat_key = None
        self.turns = []
        gc.collect()
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:
            pass

    def _sync_chat(self, settings: Settings, tools, history: list):
        """Make the Chat hold exactly `history`: kept as is when it already does (its cache is then reused),
        else rebuilt from the history (the processor's feature cache still spares re-encoding media)."""
        key = (settings.system or None, json.dumps(tools), bool(settings.enable_thinking))
        if self.chat is None or key != self.chat_key:
            factory = self._chat_factory or _chat
            self.chat = factory(self.model, self.processor, system=settings.system or None, tools=tools,
                                enable_thinking=bool(settings.enable_thinking))
            self.chat_key, self.turns = key, []
        if history != self.turns:
            self.chat.reset()
            messages = list(self.chat.messages)
            for turn in history:
                messages.append({"role": "user", "content": content_parts(turn)})
                messages.append({"role": "assistant", "content": turn["answer"]})
            self.chat.messages = messages
            self.turns = [dict(t) for t in history]

    def _run(self, job: Job):
        settings, turn = job.settings, job.turn
        for path in turn["images"] + turn["videos"]:
            media_kind(path)
        if not turn["text"].strip() and not (turn["images"] or turn["videos"]):
            raise UserError("the message is empty: type a question (and attach images or videos if you like)")
        tools = parse_tools(settings.tools)
        self._ensure_model(settings, job)
        if (turn["images"] or turn["videos"] or any(t["images"] or t["videos"] for t in job.history)) \
                and not hasattr(self.processor, "prepare"):
            raise UserError("this model has no vision tower: it cannot take images or videos")
        self._sync_chat(settings, tools, job.history)
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=int(settings.top_k),
                        max_tokens=int(settings.max_tokens))
        expert_cache = getattr(self.model, "expert_cache", None)
        if expert_cache is not None:
            expert_cache.reset_stats()
        update = Update()
        start = time.perf_counter()
        thinking_started = None
        last = None
        stream = self.chat.stream(content_parts(turn), **sampling)
        finished = False
        try:
            for response in stream:
                last = response
                for event in response.events:
                    if event.kind == "thinking":
                        thinking_started = thinking_started or time.perf_counter()
                        update.thinking += event.text
                    else:
                        if update.thinking_seconds is None and thinking_started is not None:
                            update.thinking_seconds = time.perf_counter() - thinking_started
                        if event.kind == "answer":
                            update.answer += event.text
                        else:
                            update.tool_calls.append(event.tool_call)
                job.updates.put(_copy(update))
                if job.cancelled.is_set():
                    break
            else:
                finished = True
        finally:
            stream.close()
            if not finished:
                # A stopped turn leaves tokens in the cache that the Chat does not record: start it afresh.
                self.chat.reset()
                self.turns = []
        self.generations += 1
        if update.thinking and update.thinking_seconds is None:
            update.thinking_seconds = time.perf_counter() - (thinking_started or start)
        if finished:
            self.turns = self.turns + [{**turn, "answer": update.answer}]
        if last is not None:
            update.stats = {
                "ttft": last.time_to_first_token, "prefill_tps": last.prefill_tps, "decode_tps": last.decode_tps,
                "peak_memory_gb": last.peak_memory_gb, "prompt_tokens": getattr(last, "prompt_tokens", 0),
                "prompt_tokens_processed": last.prompt_tokens_processed,
                "generation_tokens": getattr(last, "generation_tokens", 0),
                "finish_reason": last.finish_reason, "stopped": not finished,
                "expert_hit_rate": expert_cache.summary()["overall"]["hit_rate"] if expert_cache else None}
        self.last_stats = update.stats
        update.done = True
        job.updates.put(update)


def _copy(update: Update) -> Update:
    return Update(update.thinking, update.thinking_seconds, update.answer, list(update.tool_calls))


def _load(path, expert_cache_gb=None):
    from mlx_qwen35 import load

    return load(path, expert_cache_gb=expert_cache_gb)


def _chat(model, processor, **kwargs):
    from mlx_qwen35 import Chat

    return Chat(model, processor, **kwargs)
