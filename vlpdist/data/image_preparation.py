"""An image at inference as the features' images were at ingestion, then CLIP's transform.

The training features were computed from img2dataset's output, not from the original files:
transparent pixels composited on white, resized and padded (or cropped) to the download's image
size, re-encoded (JPEG at its quality by default), then decoded by the processing stage with PIL
and put through CLIP's eval transform. `ImagePreparation` repeats exactly that from the features'
provenance manifest (`vlpdist.data.provenance`), for `launcher.caption` and `launcher.evaluate`:

- with img2dataset installed, by img2dataset's own `Resizer` built from the recorded arguments
  (the very code ingestion ran: OpenCV decode, alpha matting on white, albumentations resize and
  pad, OpenCV encode);
- without it, by the same operations in PIL (alpha composited on the recorded background, the
  recorded interpolations, centred padding in the border colour or centre crop, the same encoder
  settings): equal up to the two libraries' resampling and JPEG rounding;
- with no manifest (features from an older vlpdist), alpha is composited on white (img2dataset's
  background, never black) and only CLIP's transform follows.

Every image is fully decoded once by PIL first, so a truncated or foreign file is refused with a
reason, as the processing stage refuses it. One call prepares one image and keeps only the result.
"""

from __future__ import annotations

import io
import os

from vlpdist.data.provenance import check_same_clip, resizer_arguments

PIL_ENCODER = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ImageRejected(Exception):
    """An input that yields no image: `status` is "not_an_image" or "unreadable", the message says why."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def decode_fully(data: bytes):
    """The PIL image of `data`, fully decoded (a truncated file fails here); `ImageRejected` if there is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageRejected("unreadable", f"{type(err).__name__}: {err}") from None


def img2dataset_resizer(ingestion: dict):
    """img2dataset's `Resizer` for this record, or None when img2dataset (with OpenCV and albumentations) does not import
    or its `Resizer` does not take these arguments (another version)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which would phone home
    try:
        from img2dataset.resizer import Resizer

        return Resizer(**resizer_arguments(ingestion))
    except (ImportError, TypeError):
        return None


def composite_alpha(image, background: tuple[int, int, int]):
    """An RGB image: transparent pixels composited on `background` (img2dataset's alpha matting), others converted."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def pil_resampling(name: str):
    from PIL import Image

    return {"nearest": Image.NEAREST, "linear": Image.BILINEAR, "bilinear": Image.BILINEAR, "cubic": Image.BICUBIC,
            "bicubic": Image.BICUBIC, "area": Image.BOX, "lanczos": Image.LANCZOS, "lanczos4": Image.LANCZOS}[name.lower()]


def prepare_like_img2dataset(image, ingestion: dict):
    """img2dataset's resizer in PIL: alpha, resize (smallest side for keep_ratio/center_crop, largest for
    border/keep_ratio_largest, as albumentations rounds), centre crop or centred padding, re-encode and decode."""
    from PIL import Image

    image = composite_alpha(image, tuple(ingestion["alpha_background"]))
    size, mode = ingestion["image_size"], ingestion["resize_mode"]
    width, height = image.size
    side = {"keep_ratio": min, "center_crop": min, "border": max, "keep_ratio_largest": max}.get(mode, lambda *_: None)(width, height)
    if side is not None and (not ingestion["resize_only_if_bigger"] or side > size):
        downscale = side > size
        scale = size / side
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new_size, pil_resampling(ingestion["downscale_interpolation" if downscale else "upscale_interpolation"]))
        if mode == "center_crop":
            left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        elif mode == "border" and new_size != (size, size):
            canvas = Image.new("RGB", (size, size), tuple(ingestion["border_colour"]))
            canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
            image = canvas
    encoder, quality = ingestion["encode_format"], ingestion["encode_quality"]
    buffer = io.BytesIO()
    options = {"compress_level": quality} if encoder == "png" else {"quality": quality}
    image.save(buffer, PIL_ENCODER[encoder], **options)
    with Image.open(io.BytesIO(buffer.getvalue())) as encoded:
        return encoded.convert("RGB")


class ImagePreparation:
    """Callable: image file bytes -> the (3, H, W) tensor CLIP's image tower takes, prepared as the features' images were.

    `provenance`: the features' manifest (None: no record, see the module doc); `clip_transform`: CLIP's
    eval transform (PIL image -> tensor); `use_img2dataset=False` forces the PIL reproduction."""

    def __init__(self, provenance: dict | None, clip_transform, *, use_img2dataset: bool = True):
        self.ingestion = provenance["ingestion"] if provenance is not None else None
        self.clip_transform = clip_transform
        self.resizer = img2dataset_resizer(self.ingestion) if self.ingestion is not None and use_img2dataset else None

    def describe(self) -> str:
        if self.ingestion is None:
            return "no image preparation recorded with the features: alpha on white, then CLIP's transform"
        ingestion = self.ingestion
        how = "img2dataset's own resizer" if self.resizer is not None else "PIL, as img2dataset's resizer (img2dataset not importable)"
        return (f"images prepared as ingestion did ({how}: {ingestion['resize_mode']} to {ingestion['image_size']} px, "
                f"alpha on {ingestion['alpha_background']}, {ingestion['encode_format']} q{ingestion['encode_quality']}), "
                "then CLIP's transform")

    def ingested(self, data: bytes):
        """The RGB PIL image the processing stage would have decoded from ingestion's output for this file."""
        from PIL import Image

        image = decode_fully(data)
        if self.ingestion is None:
            return composite_alpha(image, (255, 255, 255))
        if self.resizer is None:
            return prepare_like_img2dataset(image, self.ingestion)
        image.close()  # the check is done: do not hold two full-size decodes while OpenCV decodes its own
        encoded, *_, error = self.resizer(io.BytesIO(data))
        if error is not None:
            raise ImageRejected("unreadable", f"img2dataset's resizer: {error}")
        with Image.open(io.BytesIO(encoded)) as prepared:
            return prepared.convert("RGB")

    def __call__(self, data: bytes):
        return self.clip_transform(self.ingested(data))


def inference_preparation(provenance: dict | None, clip_identity: dict, clip_transform, what: str) -> ImagePreparation:
    """The preparation for a model whose CLIP is `clip_identity`; a one-line `UserError` when that CLIP is not
    the one the features were made with (`what` names the model for the message)."""
    if provenance is not None:
        check_same_clip(provenance, clip_identity, what)
    return ImagePreparation(provenance, clip_transform)
