"""The Gradio app (app/) driven over loopback: gradio_client against the app served in this process, and one
end-to-end run in headless Chromium. The model is a tiny random checkpoint with a vision tower, so answers are
gibberish: the tests check the plumbing (streaming, media kept across turns, thinking split, Stop, errors)."""

import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the app needs the `app` extra: pip install -e '.[app]'")
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from app.engine import Engine  # noqa: E402
from app.ui import ERROR_PREFIX, STATS_TITLE, build_app  # noqa: E402
from mlx_qwen35.generation.parsing import Event  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--disable-default-apps", "--disable-extensions"]
TEXT = dict(model_type="qwen3_5_text", vocab_size=248320, hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
            max_position_embeddings=65536, rms_norm_eps=1e-6, linear_conv_kernel_dim=4, linear_key_head_dim=32,
            linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"], tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True))
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
# Small pixel budgets keep an image at 4 and a short clip at 8 placeholder tokens.
PREPROCESSOR = {"size": {"shortest_edge": 4096, "longest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
VIDEO_PREPROCESSOR = dict(PREPROCESSOR, fps=2.0, min_frames=4, max_frames=8)
SETTINGS = dict(model="default", system_prompt="You are a helpful assistant.", thinking=False, temperature=0.7,
                top_p=0.95, top_k=20, max_tokens=12, expert_cache_gb=0, tools="")


def build_vision_checkpoint(path: Path) -> Path:
    """A random Qwen 3.5 checkpoint with a tiny vision tower and the real tokenizer (as demo.py's, plus vision)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_qwen35.config import ModelConfig
    from mlx_qwen35.models.qwen35 import Model
    from mlx_qwen35.tokenizer import write_tokenizer_files

    config = dict(model_type="qwen3_5", text_config=TEXT, vision_config=VISION, tie_word_embeddings=True,
                  eos_token_id=248046)
    model = Model(ModelConfig.from_dict(config))
    mx.random.seed(0)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        if name.endswith("A_log"):
            weights[name] = mx.random.uniform(-1.0, 1.0, param.shape)
        elif param.ndim == 1:
            weights[name] = param + 0.1 * mx.random.normal(param.shape)
        else:
            weights[name] = mx.random.normal(param.shape) * param.shape[-1] ** -0.5
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR))
    write_tokenizer_files(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import av

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name, color in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (64, 64), color).save(folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    (folder / "notes.txt").write_text("not an image")
    with av.open(str(folder / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = np.full((64, 64, 3), (i * 30) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    not_qwen = folder / "not-qwen"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    checkpoint = build_vision_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vision-qwen3_5")
    engine = Engine(default_model=checkpoint)
    engine.preload()
    # The random model rarely stops by itself: a short default answer keeps the browser test's wait bounded.
    demo = build_app(engine, models_dir=checkpoint.parent, max_tokens=48)
    demo.queue(default_concurrency_limit=1, max_size=16)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield demo, engine, url
    demo.close()


@pytest.fixture
def client(served):
    c = Client(served[2], verbose=False)
    yield c
    c.close()


def ask(client, text, files=(), **settings):
    args = {**SETTINGS, **settings}
    return client.submit({"text": text, "files": [handle_file(str(f)) for f in files]}, *args.values(),
                         api_name="/chat")


def final(job, timeout=60):
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, "the app did not answer in time"
        time.sleep(0.05)
    if not job.outputs():
        job.result()  # raises what the app raised
    return job.outputs()[-1]


def messages(output):
    return output if isinstance(output, list) else [output]


def split(output):
    """(thinking, answer, stats line, errors, tool call titles) of one assistant turn from /chat."""
    thinking, answer, stats, errors, tools = [], [], [], [], []
    for m in messages(output):
        m = {"content": m, "metadata": {}} if isinstance(m, str) else m
        title = (m.get("metadata") or {}).get("title") or ""
        content = m["content"] if isinstance(m["content"], str) else str(m["content"])
        if title == "Thinking":
            thinking.append(m)
        elif title.startswith(STATS_TITLE):
            stats.append(title)
        elif title:
            tools.append(title)
        elif content.startswith(ERROR_PREFIX):
            errors.append(content)
        else:
            answer.append(content)
    return thinking, "".join(answer), stats, errors, tools


def test_text_question_streams_an_answer(client):
    job = ask(client, "Hello, who are you?", max_tokens=24)
    out = final(job)
    partials = job.outputs()
    _, answer, stats, errors, _ = split(out)
    assert not errors and answer.strip()
    assert len(partials) >= 5, "the answer should arrive token by token"
    lengths = [len(split(p)[1]) for p in partials]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert len(stats) == 1 and "TTFT" in stats[0] and "decode" in stats[0] and "peak memory" in stats[0]
    assert not any(s in answer for s in ("TTFT", "tok/s")), "statistics stay out of the answer text"


def test_image_question_and_follow_up_keep_the_image(client, served, media):
    engine = served[1]
    _, answer, stats, errors, _ = split(final(ask(client, "What colour is this?", [media / "red.png"])))
    assert not errors and answer.strip() and stats
    first = engine.last_stats
    user = engine.chat.messages[-2]
    assert [p["type"] for p in user["content"]] == ["image", "text"]
    _, answer2, _, errors2, _ = split(final(ask(client, "And now compare it with this one.", [media / "blue.png"])))
    assert not errors2 and answer2.strip()
    images = [p for m in engine.chat.messages if m["role"] == "user" and isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image"]
    assert [Path(p["image"]).name for p in images] == ["red.png", "blue.png"]
    second = engine.last_stats
    # The second turn reuses the first turn's cache: it processes fewer tokens than its prompt holds.
    assert second["prompt_tokens"] > first["prompt_tokens"]
    assert second["prompt_tokens_processed"] < second["prompt_tokens"] - first["prompt_tokens"] // 2


def test_video_question(client, served, media):
    _, answer, stats, errors, _ = split(final(ask(client, "What happens in this clip?", [media / "clip.mp4"])))
    assert not errors and answer.strip() and stats
    user = served[1].chat.messages[-2]
    assert [p["type"] for p in user["content"]] == ["video", "text"]


def test_thinking_is_shown_apart_from_the_answer(client, served):
    # The random model: with thinking on, its whole output is thinking (it never closes the block).
    thinking, answer, stats, errors, _ = split(final(ask(client, "Think first.", thinking=True)))
    assert not errors and len(thinking) == 1 and thinking[0]["content"] and not answer and stats
    assert thinking[0]["metadata"]["status"] == "done" and thinking[0]["metadata"]["duration"] >= 0

    # A scripted model output through the same engine path: thinking, then </think>, answer and a tool call.
    engine = served[1]

    class Scripted:
        messages = []

        def __init__(self, model, processor, **kwargs):
            self.kwargs = kwargs

        def reset(self):
            pass

        def stream(self, content, role="user", **overrides):
            events = [Event("thinking", "Let me "), Event("thinking", "look."), Event("answer", "It is "),
                      Event("answer", "sunny."), Event("tool_call", tool_call={"name": "get_weather",
                                                                              "arguments": {"city": "Paris"}})]
            for event in events:
                time.sleep(0.02)
                yield Response([event])

    engine._chat_factory, engine.chat = Scripted, None
    try:
        out = final(ask(client, "Weather in Paris?", thinking=True, tools=served[0].example_tools))
    finally:
        engine._chat_factory, engine.chat = None, None
    thinking, answer, stats, errors, tools = split(out)
    assert [m["content"] for m in thinking] == ["Let me look."]
    assert thinking[0]["metadata"]["duration"] > 0
    assert answer == "It is sunny." and tools == ["Tool call: get_weather"] and not errors
    block = [m for m in out if m["metadata"].get("title", "").startswith("Tool call")][0]["content"]
    assert json.loads(block.strip("`").removeprefix("json")) == {"city": "Paris"}


class Response:
    def __init__(self, events):
        self.events, self.token, self.finish_reason = events, 0, None
        self.time_to_first_token = self.prefill_tps = self.decode_tps = self.peak_memory_gb = 0.0
        self.prompt_tokens = self.prompt_tokens_processed = self.generation_tokens = 1


def test_stop_mid_answer_then_a_normal_answer(client, served):
    engine = served[1]
    before = engine.generations
    job = ask(client, "Write a very long story.", max_tokens=4000, temperature=1.0, top_k=0)
    deadline = time.monotonic() + 30
    while len(split(job.outputs()[-1])[1]) < 20 if job.outputs() else True:
        assert time.monotonic() < deadline and not job.done(), "no partial answer to stop"
        time.sleep(0.02)
    job.cancel()
    deadline = time.monotonic() + 20
    while engine.busy():
        assert time.monotonic() < deadline, "the model kept generating after Stop"
        time.sleep(0.05)
    assert engine.generations == before + 1 and engine.last_stats["stopped"]
    assert engine.last_stats["generation_tokens"] < 4000
    client.reset_session()
    _, answer, stats, errors, _ = split(final(ask(client, "Hello again.")))
    assert not errors and answer.strip() and stats and not engine.last_stats["stopped"]


def test_one_generation_at_a_time_with_a_busy_message(client, served):
    from app.ui import make_respond

    engine = served[1]
    job = ask(client, "A long answer please.", max_tokens=120, temperature=1.0, top_k=0)
    deadline = time.monotonic() + 30
    while not engine.busy():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # What the UI's event runs (it has its own Gradio concurrency group, so only the engine orders them).
    gen = make_respond(engine)({"text": "me too", "files": []}, [], *list(SETTINGS.values())[:-1], "")
    first = next(gen)
    outputs = [first] + list(gen)
    assert "Busy" in first.content and "queued" in first.content
    assert job.done(), "the earlier request finishes before the queued one"
    _, answer, stats, errors, _ = split([m if isinstance(m, str) else m.__dict__ for m in messages(outputs[-1])])
    assert not errors and stats


@pytest.mark.parametrize("case", ["unsupported", "corrupt", "empty", "not_qwen", "bad_tools"])
def test_bad_input_shows_an_error_and_the_app_keeps_working(client, media, case):
    settings = {}
    files, text = [], "What is this?"
    if case == "unsupported":
        files = [media / "notes.txt"]
    elif case == "corrupt":
        files = [media / "corrupt.png"]
    elif case == "empty":
        text = ""
    elif case == "not_qwen":
        settings = {"model": str(media / "not-qwen")}
    else:
        settings = {"tools": "[{not json"}
    try:
        out = final(ask(client, text, files, **settings))
    except Exception as error:  # Gradio itself refuses a file type outside file_types, with a visible error
        assert case == "unsupported" and "invalid file type" in str(error).lower(), error
    else:
        errors = split(out)[3]
        expected = {"unsupported": "unsupported file type", "corrupt": "cannot read image", "empty": "empty",
                    "not_qwen": "not a Qwen 3.5 checkpoint", "bad_tools": "not valid JSON"}[case]
        assert len(errors) == 1 and expected in errors[0], errors
    client.reset_session()
    _, answer, stats, errors, _ = split(final(ask(client, "Still there?")))
    assert not errors and answer.strip() and stats


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run scripts/install_browser.sh as root)")
def test_browser_end_to_end(served, media):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    url = served[2]
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(30000)
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                ("http://127.0.0.1", "data:", "blob:")) else None)
            page.goto(url, wait_until="domcontentloaded")
            box = page.get_by_placeholder("Ask anything")
            box.wait_for()
            accordion = page.locator("button.label-wrap", has_text="Settings")
            thinking = page.get_by_label("Thinking")
            for _ in range(3):  # the accordion's first state depends on when the page settled
                if thinking.is_visible():
                    break
                accordion.click()
                page.wait_for_timeout(500)
            thinking.uncheck()  # the random model never closes a thinking block: ask for a plain answer
            accordion.click()
            page.locator("input[type=file]").first.set_input_files(str(media / "red.png"))
            playwright.expect(page.locator("img[src*='red.png']").first).to_be_visible()
            box.fill("What is in this image?")
            box.press("Enter")
            bot = page.get_by_test_id("bot")
            playwright.expect(page.get_by_text("TTFT").first).to_be_visible(timeout=60000)
            answer = bot.filter(has_not_text="TTFT").last.inner_text()
            assert answer.strip(), "no answer text appeared"
            assert page.get_by_test_id("user").locator("img").count() >= 1
            playwright.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
            assert not outside, f"the page reached other hosts: {outside[:3]}"
        finally:
            browser.close()
