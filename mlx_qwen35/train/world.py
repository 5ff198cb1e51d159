"""The synthetic world the shipped default model is trained on (docs/default-model.md): seeded scenes of
plain-coloured shapes drawn with Pillow, moving-shape videos, sums, long-context recall and two tools, each
turned into a chat example {"messages": [...], "tools": [...] (optional)} with one exact answer."""

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
          "purple": (130, 40, 170), "orange": (245, 130, 10)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
MIN_SIDE, MAX_SIDE = 64, 224
MAX_SHAPES = 4
# Shapes keep this many pixels apart, and "left of" needs this horizontal gap between bounding boxes.
SPACING, CLEAR_GAP = 3, 4
DIRECTIONS = ("left", "right", "up", "down")
CITIES = {"Paris": "sunny, 24 degrees", "London": "rainy, 14 degrees", "Tokyo": "cloudy, 19 degrees",
          "Cairo": "sunny, 35 degrees", "Oslo": "snowy, -3 degrees", "Lima": "foggy, 17 degrees",
          "Sydney": "windy, 22 degrees", "Toronto": "clear, 9 degrees"}
NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Nina",
         "Oscar", "Peggy", "Quinn", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zoe")
FILLER = ("The weather was mild all week.", "A train left the station at noon.", "The library opens early.",
          "Birds sang in the old oak tree.", "The river was calm this morning.", "A new bakery opened nearby.",
          "The meeting moved to Thursday.", "Someone left a blue umbrella.", "The garden needs more water.",
          "The museum has a new exhibit.", "Snow fell on the distant hills.", "The bus was ten minutes late.")
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]


@dataclass
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    r: float  # circle radius; half the side of a square; triangles fill the same box

    @property
    def box(self):
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class Scene:
    width: int
    height: int
    background: tuple
    shapes: list = field(default_factory=list)


def draw(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    pen = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        fill = COLORS[s.color]
        if s.kind == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def random_background(rng: random.Random) -> tuple:
    choice = rng.choice(["white", "black", "grey", "pale"])
    if choice == "pale":  # every channel >= 200 keeps it far from all six shape colours
        return tuple(rng.randint(200, 250) for _ in range(3))
    return BACKGROUNDS[choice]


def random_scene(rng: random.Random, count: int | None = None, width: int | None = None,
                 height: int | None = None, fixed: list | None = None, growth: float = 1.0) -> Scene:
    """1-4 non-overlapping shapes (or `count`) on a plain background; `fixed` (kind, color) pairs come first.
    `growth` below 1 draws larger and fewer shapes (`radius_range`; at most 1 + 3 x growth of them unless
    `count` says otherwise): the training curriculum starts there. The world itself is growth 1."""
    growth = min(max(growth, 0.0), 1.0)
    width = width or rng.randint(MIN_SIDE, MAX_SIDE)
    height = height or rng.randint(MIN_SIDE, MAX_SIDE)
    count = count if count is not None else shape_count(rng, growth)
    pairs = list(fixed or []) + [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(count)]
    pairs = pairs[:max(count, len(fixed or []))]
    for attempt in range(100):
        scene = Scene(width, height, random_background(rng))
        side = min(width, height)
        for kind, color in pairs:
            # large early-curriculum shapes may not fit together: later attempts fall back to the world's sizes
            shape = _place(rng, scene, kind, color, side, growth if attempt < 50 else 1.0)
            if shape is None:
                break
            scene.shapes.append(shape)
        else:
            return scene
    raise RuntimeError(f"could not place {len(pairs)} shapes in {width}x{height}")


def shape_count(rng: random.Random, growth: float, most: int = MAX_SHAPES) -> int:
    """1 to `most` shapes at growth 1; the curriculum's smaller scenes (growth below 1) hold fewer."""
    return rng.randint(1, 1 + int((most - 1) * growth))


def radius_range(side: int, growth: float = 1.0) -> tuple[float, float]:
    """Radius bounds of a shape on a canvas whose shorter side is `side`: the world's side/14 to side/6 at
    growth 1; at growth 0 side/4 to side/2.6, a shape that covers most of a small image (linear between)."""
    low, high = side / 14, side / 6
    growth = min(max(growth, 0.0), 1.0)
    return (side / 4 + (low - side / 4) * growth, side / 2.6 + (high - side / 2.6) * growth)


def _place(rng, scene, kind, color, side, growth=1.0):
    low, high = radius_range(side, growth)
    for _ in range(200):
        r = rng.uniform(max(5.0, low), max(6.0, high))
        cx, cy = rng.uniform(r + 1, scene.width - r - 2), rng.uniform(r + 1, scene.height - r - 2)
        shape = Shape(kind, color, round(cx), round(cy), round(r))
        if all(_apart(shape, other) for other in scene.shapes):
            return shape
    return None


def _apart(a: Shape, b: Shape) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + SPACING < bx0 or bx1 + SPACING < ax0 or ay1 + SPACING < by0 or by1 + SPACING < ay0


# --- questions about one scene: each returns (question, answer) or None when it does not apply ---

def unique(scene: Scene, **match) -> list:
    return [s for s in scene.shapes if all(getattr(s, k) == v for k, v in match.items())]


def ask_color(rng, scene):
    kinds = [k for k in SHAPES if len(unique(scene, kind=k)) == 1]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    return f"What color is the {kind}?", f"{unique(scene, kind=kind)[0].color}."


def ask_shape(rng, scene):
    colors = [c for c in COLORS if len(unique(scene, color=c)) == 1]
    if not colors:
        return None
    color = rng.choice(colors)
    return f"What shape is {color}?", f"A {unique(scene, color=color)[0].kind}."


def ask_count(rng, scene, kind: str | None = None):
    kind = kind or rng.choice(SHAPES)
    return f"How many {kind}s are there?", f"{len(unique(scene, kind=kind))}."


def left_right_pair(rng, scene, name_by=("kind", "color")):
    """Two shapes whose horizontal order is clear (a, b), each the only one in the scene with its `name_by`
    attributes (the world's name: colour and kind), or None."""
    named = [s for s in scene.shapes if len(unique(scene, **{k: getattr(s, k) for k in name_by})) == 1]
    pairs = [(a, b) for a in named for b in named if a is not b and horizontal_order(a, b) is not None]
    return rng.choice(pairs) if pairs else None


def ask_left_right(rng, scene):
    pair = left_right_pair(rng, scene)
    if pair is None:
        return None
    a, b = pair
    return (f"Is the {a.name} left or right of the {b.name}?",
            "Left." if horizontal_order(a, b) == "left" else "Right.")


def horizontal_order(a: Shape, b: Shape):
    """"left" / "right" when a's box ends CLEAR_GAP before b's starts (or the reverse), else None."""
    if a.box[2] + CLEAR_GAP <= b.box[0]:
        return "left"
    if b.box[2] + CLEAR_GAP <= a.box[0]:
        return "right"
    return None


def ask_describe(rng, scene):
    shapes = sorted(scene.shapes, key=lambda s: s.cx)
    if any(b.cx - a.cx < CLEAR_GAP for a, b in zip(shapes, shapes[1:])):
        return None  # "left to right" would be ambiguous
    return "Describe the image.", describe(shapes)


def describe(shapes) -> str:
    parts = [f"a {s.name}" for s in shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


SCENE_QUESTIONS = {"color": ask_color, "shape": ask_shape, "count": ask_count, "left_right": ask_left_right,
                   "describe": ask_describe}


def _user(parts, text):
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _chat(user, answer, tools=None) -> dict:
    example = {"messages": [user, {"role": "assistant", "content": answer}]}
    if tools:
        example["tools"] = tools
    return example


def image_example(rng: random.Random, question=None, growth: float = 1.0) -> dict:
    """One image and one question about it (a random applicable one, or the given generator); `growth` as in
    `random_scene`."""
    while True:
        scene = random_scene(rng, growth=growth)
        ask = question or rng.choice(list(SCENE_QUESTIONS.values()))
        qa = ask(rng, scene)
        if qa is not None:
            example = _chat(_user([{"type": "image", "image": draw(scene)}], qa[0]), qa[1])
            example["scenes"] = [scene]
            return example


def image_conversation(rng: random.Random, turns: int, growth: float = 1.0) -> dict:
    """One image and up to `turns` different questions about it, asked one after another in a multi-turn chat
    (the follow-up questions an app user asks): the image is read once and every answer is a target."""
    if turns < 1:
        raise ValueError(f"image_conversation needs at least one turn; got turns={turns}")
    while True:
        scene = random_scene(rng, growth=growth)
        asks = rng.sample(list(SCENE_QUESTIONS.values()), len(SCENE_QUESTIONS))
        pairs = [qa for qa in (ask(rng, scene) for ask in asks) if qa is not None][:turns]
        if pairs:
            break
    messages = [_user([{"type": "image", "image": draw(scene)}], pairs[0][0]), {"role": "assistant", "content": pairs[0][1]}]
    for question, answer in pairs[1:]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "scenes": [scene]}


def multi_image_example(rng: random.Random) -> dict:
    """2-4 pictures, exactly one of which holds the asked-for (color, shape)."""
    count = rng.randint(2, 4)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    target = rng.randrange(count)
    scenes = []
    for i in range(count):
        while True:
            scene = random_scene(rng, count=rng.randint(1, 3), fixed=[(kind, color)] if i == target else None)
            if (len(unique(scene, kind=kind, color=color)) == 1) == (i == target):
                scenes.append(scene)
                break
    parts = [{"type": "image", "image": draw(s)} for s in scenes]
    example = _chat(_user(parts, f"Which picture has the {color} {kind}?"), f"Picture {target + 1}.")
    example["scenes"] = scenes
    return example


def video_scenes(rng: random.Random, frames: int | None = None, direction: str | None = None,
                 growth: float = 1.0) -> tuple:
    """4-8 frames of one shape moving steadily in `direction` (others stay still). Returns (scenes, moving
    shape's index, direction). `growth` below 1 (the training curriculum) draws the mover alone, larger
    (random_scene's growth 0.5 at 0) and crossing more of the free room (all of it at 0, half in the world)."""
    growth = min(max(growth, 0.0), 1.0)
    frames = frames or rng.randint(4, 8)
    direction = direction or rng.choice(DIRECTIONS)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    while True:
        count = rng.randint(1, 2) if growth == 1.0 else 1
        first = random_scene(rng, count=count, growth=0.5 + 0.5 * growth)
        mover = first.shapes[0]
        low, high = mover.r + 2, (first.width if dx else first.height) - mover.r - 3
        step = int((high - low) * (1 - 0.5 * growth)) // (frames - 1)
        if step < 2 or len(unique(first, kind=mover.kind, color=mover.color)) != 1:
            continue
        span = step * (frames - 1)
        start = rng.randint(low, high - span) if dx + dy > 0 else rng.randint(low + span, high)
        scenes = []
        for t in range(frames):
            x = start + dx * step * t if dx else mover.cx
            y = start + dy * step * t if dy else mover.cy
            moved = Shape(mover.kind, mover.color, x, y, mover.r)
            scenes.append(Scene(first.width, first.height, first.background, [moved, *first.shapes[1:]]))
        if all(_apart(s.shapes[0], other) for s in scenes for other in s.shapes[1:]):
            return scenes, 0, direction


def video_example(rng: random.Random, growth: float = 1.0) -> dict:
    scenes, index, direction = video_scenes(rng, growth=growth)
    mover = scenes[0].shapes[index]
    user = _user([{"type": "video", "video": [draw(s) for s in scenes]}], f"Which way does the {mover.name} move?")
    example = _chat(user, direction.capitalize() + ".")
    example["scenes"] = scenes
    return example


def sum_example(rng: random.Random, thinking: bool | None = None, largest: int = 99) -> dict:
    """"What is {a} + {b}?" with a and b in 0..`largest` (the world's: 99), with or without a thinking block."""
    if largest < 0:
        raise ValueError(f"sum_example needs largest >= 0 (the operands are 0..largest); got largest={largest}")
    a, b = rng.randint(0, largest), rng.randint(0, largest)
    thinking = rng.random() < 0.5 if thinking is None else thinking
    answer = f"{a + b}."
    if thinking:
        answer = f"<think>\n{a} plus {b} is {a + b}.\n</think>\n\n" + answer
    example = _chat({"role": "user", "content": f"What is {a} + {b}?"}, answer)
    example["thinking"] = thinking
    return example


def recall_example(rng: random.Random, min_tokens: int = 100, max_tokens: int = 2000, questions: int = 1,
                   facts: int = 4, least_facts: int = 1) -> dict:
    """Filler sentences with `least_facts`-`facts` "The code for NAME is DDDD." facts hidden among them, then a
    question about one; with `questions` > 1, follow-up turns ask about more of the passage's names (a training
    row that reads the passage once for several answers). Length is measured in words x 1.4 (about the BPE token
    count of this text)."""
    if not 1 <= least_facts <= facts <= len(NAMES):
        raise ValueError(f"recall_example needs 1 <= least_facts <= facts <= {len(NAMES)} (the names); got "
                         f"least_facts={least_facts}, facts={facts}")
    target_words = int(rng.randint(min_tokens, max_tokens) / 1.4)
    names = rng.sample(NAMES, rng.randint(least_facts, facts))
    codes = {n: f"{rng.randint(0, 9999):04d}" for n in names}
    sentences = [rng.choice(FILLER) for _ in range(max(1, target_words // 6))]
    for name in names:
        sentences.insert(rng.randint(0, len(sentences)), f"The code for {name} is {codes[name]}.")
    asked = [rng.choice(names)]
    if questions > 1:
        asked += rng.sample([n for n in names if n != asked[0]], min(questions, len(names)) - 1)
    text = " ".join(sentences) + f"\n\nWhat is the code for {asked[0]}?"
    example = _chat({"role": "user", "content": text}, f"{codes[asked[0]]}.")
    for name in asked[1:]:
        example["messages"] += [{"role": "user", "content": f"What is the code for {name}?"},
                                {"role": "assistant", "content": f"{codes[name]}."}]
    return example


def tool_example(rng: random.Random, turns: int = 1) -> dict:
    """A question that needs a tool: the XML tool call, the tool's response, then an answer quoting it; with
    `turns` > 1, that many such exchanges in one conversation (a training row that reads the tool
    declarations once)."""
    messages = []
    for _ in range(turns):
        if rng.random() < 0.5:
            city = rng.choice(list(CITIES))
            question, call = f"What is the weather in {city}?", {"name": "get_weather", "arguments": {"city": city}}
            result = CITIES[city]
            answer = f"The weather in {city} is {result}."
        else:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            question, call = f"Use the add tool to add {a} and {b}.", {"name": "add", "arguments": {"a": a, "b": b}}
            result = str(a + b)
            answer = f"The sum is {result}."
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                     {"role": "tool", "content": result},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": TOOLS}


GENERATORS = {"image": image_example, "multi_image": multi_image_example, "video": video_example,
              "sum": sum_example, "recall": recall_example, "tool": tool_example}
DEFAULT_MIX = {"image": 0.45, "multi_image": 0.1, "video": 0.1, "sum": 0.15, "recall": 0.1, "tool": 0.1}


def examples(seed: int = 0, mix: dict | None = None):
    """An endless, seeded stream of examples drawn by kind with the weights of `mix`."""
    rng = random.Random(seed)
    mix = mix or DEFAULT_MIX
    kinds, weights = list(mix), list(mix.values())
    while True:
        yield GENERATORS[rng.choices(kinds, weights)[0]](rng)
