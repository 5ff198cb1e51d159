"""Draw the example media shipped in examples/ from the synthetic world (seeded), with their true answers in
examples/answers.json, and the world's tool schemas in examples/tools.json: `python examples/make_examples.py`."""

import json
import random
from pathlib import Path

import av
import numpy as np

from mlx_qwen35.train import world

HERE = Path(__file__).resolve().parent


def shapes_image(seed: int = 7):
    """A scene with three shapes of different kinds and colours, far enough apart to describe left to right."""
    rng = random.Random(seed)
    while True:
        scene = world.random_scene(rng, count=3, width=200, height=140)
        if len({s.kind for s in scene.shapes}) == 3 and len({s.color for s in scene.shapes}) == 3 and \
                world.ask_describe(rng, scene) is not None and scene.background == world.BACKGROUNDS["white"]:
            return scene


def write_video(path: Path, scenes, fps: int = 24):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = scenes[0].width, scenes[0].height, "yuv420p"
        stream.options = {"crf": "10"}
        for scene in scenes:
            frame = av.VideoFrame.from_ndarray(np.asarray(world.draw(scene)), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def main():
    scene = shapes_image()
    world.draw(scene).save(HERE / "shapes.png")
    answers = {"shapes.png": {}}
    for shape in scene.shapes:
        answers["shapes.png"][f"What color is the {shape.kind}?"] = f"{shape.color}."
        answers["shapes.png"][f"What shape is {shape.color}?"] = f"A {shape.kind}."
    answers["shapes.png"]["Describe the image."] = world.describe(sorted(scene.shapes, key=lambda s: s.cx))
    rng = random.Random(11)
    scenes, index, direction = world.video_scenes(rng, frames=8, direction="right")
    # even sides for yuv420p
    scenes = [world.Scene(s.width // 2 * 2, s.height // 2 * 2, s.background, s.shapes) for s in scenes]
    write_video(HERE / "moving.mp4", scenes)
    mover = scenes[0].shapes[index]
    answers["moving.mp4"] = {f"Which way does the {mover.name} move?": direction.capitalize() + "."}
    (HERE / "answers.json").write_text(json.dumps(answers, indent=2) + "\n")
    (HERE / "tools.json").write_text(json.dumps(world.TOOLS, indent=2) + "\n")  # for `generate --tools`


if __name__ == "__main__":
    main()
