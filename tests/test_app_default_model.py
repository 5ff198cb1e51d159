"""The Gradio app serving the shipped default model (docs/default-model.md), driven over loopback with
gradio_client and once in headless Chromium. The model is trained on a synthetic world, so the answers are
checked against the truth: examples/answers.json (drawn by examples/make_examples.py from the world generator)
and the world's sum format (`{a} plus {b} is {a+b}.` thinking, then `{a+b}.`)."""

import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app needs the `app` extra: pip install -e '.[app]'")
from mlx_qwen35.loading import DEFAULT_MODEL_PATH  # noqa: E402

if not (DEFAULT_MODEL_PATH / "model.safetensors").exists():
    pytest.skip("the trained default model is not built yet (mlx-qwen35 train-default)", allow_module_level=True)
from gradio_client import Client, handle_file  # noqa: E402
from test_app import final, free_port, split  # noqa: E402
from test_default_model import Truth, skills_of  # noqa: E402

from app.engine import Engine  # noqa: E402
from app.ui import build_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
EXAMPLES = ROOT / "examples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--disable-default-apps", "--disable-extensions"]
ANSWERS = json.loads((EXAMPLES / "answers.json").read_text())
IMAGE, VIDEO = EXAMPLES / "shapes.png", EXAMPLES / "moving.mp4"
# Greedy decoding through the API (otherwise the UI's defaults); the browser test keeps the UI's defaults.
SETTINGS = dict(model="default", system_prompt="", thinking=True, temperature=0.0, top_p=1.0, top_k=0,
                max_tokens=48, expert_cache_gb=0, tools="")


@pytest.fixture(scope="module")
def served():
    engine = Engine()  # the shipped default model
    engine.preload()
    demo = build_app(engine)
    demo.queue(default_concurrency_limit=1, max_size=16)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
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


def answer_of(client, text, files=(), **settings):
    thinking, answer, stats, errors, _ = split(final(ask(client, text, files, **settings), timeout=120))
    assert not errors and len(stats) == 1, (errors, stats)
    return thinking, answer


def user_media(engine) -> list:
    """[(kinds of the media parts)] of each user turn the engine's Chat holds."""
    return [[p["type"] for p in m["content"] if p["type"] != "text"] if isinstance(m["content"], list) else []
            for m in engine.chat.messages if m["role"] == "user"]


@pytest.mark.parametrize("question", list(ANSWERS["shapes.png"]))
def test_image_question_is_answered_correctly(client, served, question):
    thinking, answer = answer_of(client, question, [IMAGE])
    truth = Truth()
    truth.check(answer, ANSWERS["shapes.png"][question], *skills_of(question))
    # Thinking is on (the UI's default) but the model closes an empty block for world questions: no panel.
    assert thinking == []
    assert user_media(served[1]) == [["image"]]
    truth.done()


def test_two_turns_the_second_refers_back_to_the_first_image(client, served):
    answers, truth = ANSWERS["shapes.png"], Truth()
    for question, files in (("What color is the circle?", [IMAGE]), ("What shape is green?", []),
                            ("What shape is red?", [])):
        # Text only after the first: the answer can only come from the first turn's image, still in context.
        truth.check(answer_of(client, question, files)[1], answers[question], *skills_of(question))
    assert user_media(served[1]) == [["image"], [], []]
    truth.done()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """examples/moving.mp4 plus one clip per direction drawn from the world generator (so that a model that
    always answers one direction cannot pass): [(path, question, true answer)]."""
    import importlib.util
    import random

    from mlx_qwen35.train import world

    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    (question, truth), = ANSWERS["moving.mp4"].items()
    out, folder = [(VIDEO, question, truth)], tmp_path_factory.mktemp("clips")
    rng = random.Random(2024)
    for i, direction in enumerate(world.DIRECTIONS):
        scenes, index, direction = world.video_scenes(rng, frames=8, direction=direction)
        scenes = [world.Scene(s.width // 2 * 2, s.height // 2 * 2, s.background, s.shapes) for s in scenes]
        make_examples.write_video(folder / f"clip{i}.mp4", scenes)
        out.append((folder / f"clip{i}.mp4", f"Which way does the {scenes[0].shapes[index].name} move?",
                    direction.capitalize() + "."))
    return out


def test_video_questions_are_answered_correctly(served, clips):
    truth = Truth()
    for path, question, direction in clips:
        c = Client(served[2], verbose=False)
        try:
            thinking, answer = answer_of(c, question, [path])
        finally:
            c.close()
        assert thinking == [] and user_media(served[1]) == [["video"]]
        truth.check(answer, direction, "video")
    truth.done()


@pytest.mark.parametrize("a, b", [(12, 34), (7, 85)])
def test_sum_with_thinking_shows_the_thinking_apart_from_the_answer(client, a, b):
    question = f"What is {a} + {b}?"
    job = ask(client, question, thinking=True)
    thinking, answer, _, errors, _ = split(final(job, timeout=120))
    assert not errors and len(thinking) == 1
    truth = Truth()
    truth.check(answer, f"{a + b}.", "sum_thinking")
    truth.check(thinking[0]["content"], f"{a} plus {b} is {a + b}.", "sum_thinking")
    assert thinking[0]["metadata"]["status"] == "done" and thinking[0]["metadata"]["duration"] >= 0
    # While it streamed, the thinking showed (still pending) before any answer text.
    early = [split(p) for p in job.outputs()]
    assert any(t and t[0]["metadata"]["status"] == "pending" and not ans for t, ans, *_ in early)
    client.reset_session()
    thinking, answer = answer_of(client, question, thinking=False)
    assert thinking == []  # the toggle: no thinking at all
    truth.check(answer, f"{a + b}.", "sum")
    truth.done()


def test_stop_mid_answer_then_the_whole_answer(client, served):
    from mlx_qwen35 import Chat

    engine = served[1]
    question, truth = "Describe the image.", Truth()

    class SlowChat(Chat):
        """The real Chat, its tokens held back 0.25 s each so that Stop lands mid-answer (the default model's
        answers are a few tokens long)."""

        def stream(self, *args, **kwargs):
            inner = super().stream(*args, **kwargs)
            try:
                for response in inner:
                    time.sleep(0.25)
                    yield response
            finally:
                inner.close()

    while engine.busy():
        time.sleep(0.05)
    engine._chat_factory, engine.chat = SlowChat, None
    try:
        before = engine.generations
        job = ask(client, question, [IMAGE])
        deadline = time.monotonic() + 60
        while not (job.outputs() and split(job.outputs()[-1])[1]):
            assert time.monotonic() < deadline and not job.done(), "no partial answer to stop"
            time.sleep(0.02)
        partial = split(job.outputs()[-1])[1]
        job.cancel()
        deadline = time.monotonic() + 20
        while engine.busy():
            assert time.monotonic() < deadline, "the model kept generating after Stop"
            time.sleep(0.05)
    finally:
        engine._chat_factory, engine.chat = None, None
    assert engine.generations == before + 1 and engine.last_stats["stopped"]
    stopped_at = engine.last_stats["generation_tokens"]
    client.reset_session()
    _, full = answer_of(client, question, [IMAGE])  # the same greedy answer, not stopped
    assert not engine.last_stats["stopped"]
    assert full.startswith(partial) and len(partial) < len(full)
    assert stopped_at < len(engine.processor.tokenizer.encode(full, add_special_tokens=False))
    truth.check(full, ANSWERS["shapes.png"][question], *skills_of(question))
    truth.done()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run scripts/install_browser.sh as root)")
def test_browser_end_to_end(served):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    question = "What color is the circle?"
    truth = ANSWERS["shapes.png"][question]
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(30000)
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                ("http://127.0.0.1", "data:", "blob:")) else None)
            page.goto(served[2], wait_until="domcontentloaded")
            box = page.get_by_placeholder("Ask anything")
            box.wait_for()
            page.locator("input[type=file]").first.set_input_files(str(IMAGE))
            playwright.expect(page.locator("img[src*='shapes.png']").first).to_be_visible()
            # Greedy, so what is checked is the model's answer and not one draw at the default temperature 0.7
            # (the default model, thinking on: the UI's other defaults).
            temperature = page.get_by_label("number input for Temperature")  # the Settings accordion starts open
            temperature.fill("0")
            temperature.press("Tab")
            box.fill(question)
            box.press("Enter")
            playwright.expect(page.get_by_text("TTFT").first).to_be_visible(timeout=120000)
            playwright.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)  # kept, right or wrong
            bot = page.get_by_test_id("bot")
            texts = [t.strip() for t in bot.all_inner_texts()]
            answers = [t for t in texts if "TTFT" not in t]
            assert len(answers) == 1, texts
            assert not any("Thinking" in t for t in texts), "an empty thinking block showed a panel"
            user = page.get_by_test_id("user")
            assert user.locator("img").count() == 1 and question in " ".join(user.all_inner_texts())
            assert not outside, f"the page reached other hosts: {outside[:3]}"
            checked = Truth()
            checked.check(answers[0], truth, "color")
            checked.done()
        finally:
            browser.close()
