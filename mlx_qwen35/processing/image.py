"""Images to vision-tower input (spec 4.2): load as RGB, resize bicubic to a multiple of patch * merge
within a pixel budget, scale to [-1, 1], and cut into rows of (C, T=2, P, P) patches in merge-block order."""

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels], aspect kept."""
    if min(height, width) < 1:
        raise ValueError(f"image has zero size ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                         f"{MAX_ASPECT_RATIO} ({height}x{width})")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def describe(source) -> str:
    if isinstance(source, (str, Path)):
        return repr(str(source))
    if isinstance(source, np.ndarray):
        return f"array of shape {source.shape}"
    return type(source).__name__


def load_image(source) -> Image.Image:
    """A path, URL, PIL image or array (H, W, C) / (C, H, W), uint8 or float in [0, 1] -> RGB PIL image."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (str, Path)):
        image = _open(source)
    else:
        raise TypeError(f"an image must be a path, URL, PIL image or numpy array; got {type(source).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {describe(source)} has zero size ({image.width}x{image.height})")
    # Transparency is composited onto white, as transformers' convert_to_rgb does.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _open(source) -> Image.Image:
    text = str(source)
    if text.startswith(("http://", "https://")):
        data = fetch_url(text)
        name = text
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file {text!r} does not exist")
        data, name = path.read_bytes(), text
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a truncated file fails here and not inside the resize
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {name!r}: {error}") from error
    return image


def fetch_url(url: str, timeout: float = 30.0) -> bytes:
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=timeout) as response:
            return response.read()
    except (URLError, OSError) as error:
        raise ValueError(f"cannot download {url!r} (no network, or the server refused): {error}") from error


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"an image array must be (H, W, C) or (C, H, W); got shape {array.shape}")
    if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if 0 in array.shape:
        raise ValueError(f"image array of shape {array.shape} has zero size")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.max() <= 1.0:
            array = array * 255
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array), "RGBA" if array.shape[-1] == 4 else "RGB")


def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 [..., C, H, W], x / 255 then (x - mean) / std."""
    x = (pixels.astype(np.float64) / 255.0).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.moveaxis(x, -1, -3)


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int):
    """frames [T, C, H, W] (T a multiple of temporal_patch_size) -> (patches [t*gh*gw, C*Tp*P*P], (t, gh, gw)).
    Rows run over (t, block row, block col, row in block, col in block); each row is (C, Tp, P, P)."""
    T, C, H, W = frames.shape
    t, gh, gw, m, p = T // temporal_patch_size, H // patch_size, W // patch_size, merge_size, patch_size
    x = frames.reshape(t, temporal_patch_size, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(t * gh * gw, C * temporal_patch_size * p * p), (t, gh, gw)


def preprocess_image(source, *, patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=65536,
                     max_pixels=16777216, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """One image -> (pixel_values [gh*gw, 3*2*P*P] float32, grid_thw (1, gh, gw))."""
    image = load_image(source)
    try:
        height, width = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    except ValueError as error:
        raise ValueError(f"image {describe(source)}: {error}") from None
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    frame = normalize(np.asarray(image), mean, std)
    # One picture fills both temporal slots of the 3-D patch.
    frames = np.repeat(frame[None], temporal_patch_size, axis=0)
    patches, (_, gh, gw) = patchify(frames, patch_size, temporal_patch_size, merge_size)
    return patches, (1, gh, gw)
