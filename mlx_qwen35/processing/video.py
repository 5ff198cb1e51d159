"""Video to vision-tower input (spec 4.3): decode with PyAV, sample frames at a target fps, resize every frame
to one size chosen under a budget on frames x pixels, pad to an even frame count, and patchify in pairs."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image import MAX_ASPECT_RATIO, load_image, normalize, patchify

DEFAULT_SOURCE_FPS = 24.0  # assumed for a list of frames, as the reference processor assumes


@dataclass
class Video:
    frames: np.ndarray  # [T, H, W, 3] uint8, the sampled frames
    indices: np.ndarray  # [T] their indices in the source
    fps: float  # of the source


def sample_indices(total: int, source_fps: float, fps: float = 2.0, min_frames: int = 4,
                   max_frames: int = 768) -> np.ndarray:
    """Indices of the frames kept: `fps` per second of video, clamped to [min_frames, max_frames] and to total."""
    n = int(total / source_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def timestamps(indices, source_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds for each temporal group: the mean time of its first and last frame (last index repeated to pad)."""
    indices = list(indices)
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / source_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def load_video(source, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
               source_fps: float | None = None) -> Video:
    """A video file (decoded with PyAV) or a sequence of frames (anything load_image takes, or an array
    [T, H, W, C]) -> the sampled frames. A frame list plays at `source_fps` (default 24)."""
    if isinstance(source, (str, Path)):
        return _decode(source, fps, min_frames, max_frames, source_fps)
    if isinstance(source, np.ndarray) and source.ndim == 4:
        source = list(source)
    if not isinstance(source, (list, tuple)):
        raise TypeError(f"a video must be a file path or a list of frames; got {type(source).__name__}")
    if not source:
        raise ValueError("video (a list of frames) has no frames")
    frames = [np.asarray(load_image(f)) for f in source]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"video frames differ in size: {sorted({f.shape[:2] for f in frames})}")
    source_fps = source_fps or DEFAULT_SOURCE_FPS
    indices = sample_indices(len(frames), source_fps, fps, min_frames, max_frames)
    return Video(np.stack([frames[i] for i in indices]), indices, float(source_fps))


def _decode(source, fps, min_frames, max_frames, source_fps) -> Video:
    import av

    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"video file {str(source)!r} does not exist")

    def read(total):
        """The sampled frames, given the frame count; also returns the count actually decoded."""
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            rate = source_fps or (float(stream.average_rate) if stream.average_rate else DEFAULT_SOURCE_FPS)
            total = total or stream.frames
            wanted = set(sample_indices(total, rate, fps, min_frames, max_frames).tolist()) if total else None
            kept, count = {}, 0
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                count += 1
        return kept, count, rate, total

    try:
        kept, count, rate, total = read(None)
        if count and count != total:  # the header's frame count was missing or wrong: sample the true count
            kept, count, rate, total = read(count)
    except (av.error.FFmpegError, ValueError, OSError) as error:
        raise ValueError(f"cannot read video {str(source)!r}: {error}") from error
    if not count:
        raise ValueError(f"video {str(source)!r} has no frames")
    indices = sample_indices(count, rate, fps, min_frames, max_frames)
    return Video(np.stack([kept[i] for i in indices]), indices, float(rate))


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """Frame (height, width) as multiples of `factor` with frames x height x width within the budget."""
    if min(height, width) < 1:
        raise ValueError(f"video frames have zero size ({height}x{width})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"video aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                         f"{MAX_ASPECT_RATIO} ({height}x{width})")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_video(video: Video, *, patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=4096,
                     max_pixels=25165824, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Sampled frames -> (pixel_values [t*gh*gw, 3*2*P*P] float32, grid_thw (t, gh, gw), timestamps [t])."""
    T, H, W, _ = video.frames.shape
    height, width = smart_resize_video(T, H, W, temporal_patch_size, patch_size * merge_size, min_pixels,
                                       max_pixels)
    frames = video.frames
    if (height, width) != (H, W):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                           for f in frames])
    x = normalize(frames, mean, std)
    if pad := -T % temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    patches, grid = patchify(x, patch_size, temporal_patch_size, merge_size)
    return patches, grid, timestamps(video.indices, video.fps, temporal_patch_size)
