"""CapFilt (BLIP's caption bootstrapping): a captioner proposes captions, a filter scores them.

Captioner: `BlipForConditionalGeneration`, nucleus sampling, n captions per image.
Filters: the BLIP ITM head's match probability (`BlipForImageTextRetrieval`) or the CLIP cosine
score. Models load by Hugging Face name or local folder through `from_pretrained`, so a real
checkpoint (`Salesforce/blip-image-captioning-base`) and a tiny local test model take one path.
The policy decides which passing captions a sample keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlpdist.errors import UserError

POLICIES = ("web", "synthetic", "web_and_synthetic", "web_else_synthetic")
FILTERS = ("clip", "itm", "none")


def check_blip_folder(key: str, name_or_path: str) -> None:
    """A BLIP model named by a path must be a folder (a hub name is `from_pretrained`'s to resolve)."""
    from pathlib import Path

    if name_or_path.startswith((".", "/")) and not Path(name_or_path).is_dir():
        raise UserError(f"config key '{key}': cannot load BLIP model {name_or_path!r}: no such folder")


def _from_pretrained(model_class, name_or_path: str, device: str, key: str):
    from transformers import BlipProcessor

    check_blip_folder(key, name_or_path)
    try:
        processor = BlipProcessor.from_pretrained(name_or_path)
        model = model_class.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # not on the hub / not a model folder / bad repo id
        raise UserError(f"cannot load BLIP model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), processor


def load_captioner(name_or_path: str, device: str = "cpu"):
    """(BlipForConditionalGeneration, BlipProcessor) from a HF name or a local folder."""
    from transformers import BlipForConditionalGeneration

    return _from_pretrained(BlipForConditionalGeneration, name_or_path, device, "process.captioner")


def load_itm(name_or_path: str, device: str = "cpu"):
    """(BlipForImageTextRetrieval, BlipProcessor) from a HF name or a local folder."""
    from transformers import BlipForImageTextRetrieval

    return _from_pretrained(BlipForImageTextRetrieval, name_or_path, device, "process.itm_model")


def generate_captions(
    model, processor, pixel_values_B3HW, num_captions: int, top_p: float, max_new_tokens: int, device: str
) -> list[list[str]]:
    """Nucleus-sampled captions: for each of B images (as `processor` preprocessed them), `num_captions`
    strings (a sample may be empty)."""
    import torch

    from data_ingest.process.clip_model import inference_autocast

    with torch.no_grad(), inference_autocast(device):
        token_ids = model.generate(
            pixel_values=pixel_values_B3HW.to(device),
            do_sample=True,
            top_p=top_p,
            top_k=0,
            num_return_sequences=num_captions,
            max_new_tokens=max_new_tokens,
        )  # (B * n, T), the n samples of an image adjacent
    texts = [text.strip() for text in processor.batch_decode(token_ids, skip_special_tokens=True)]
    return [texts[i * num_captions : (i + 1) * num_captions] for i in range(len(pixel_values_B3HW))]


def itm_probabilities(model, processor, pixel_values_B3HW, texts_per_image: list[int], texts: list[str],
                      device: str) -> list[float]:
    """P(image matches text) from the ITM head for N texts, the first `texts_per_image[0]` about image 0,
    the next about image 1, and so on (B images as `processor` preprocessed them).

    The vision model runs once per image, and its patch embeddings are repeated for each of that
    image's texts into the ITM text encoder: what `BlipForImageTextRetrieval.forward` computes for
    N (image, text) pairs (as LAVIS does), without encoding an image once per caption.
    """
    import torch

    from data_ingest.process.clip_model import inference_autocast

    if not texts:
        return []
    tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad(), inference_autocast(device):
        image_BSW = model.vision_model(pixel_values=pixel_values_B3HW.to(device)).last_hidden_state  # (B, S, W)
        image_NSW = torch.repeat_interleave(image_BSW, torch.tensor(texts_per_image, device=image_BSW.device), dim=0)
        text_NTW = model.text_encoder(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_NSW,
            encoder_attention_mask=torch.ones(image_NSW.shape[:-1], dtype=torch.long, device=image_NSW.device),
        ).last_hidden_state  # (N, T, W)
        logits_N2 = model.itm_head(text_NTW[:, 0, :])  # [no match, match]
    return torch.softmax(logits_N2.float(), dim=-1)[:, 1].cpu().tolist()


@dataclass
class CaptionChoice:
    """Which captions of one sample survive, and why."""

    kept: list[str]  # web caption first (if kept), then kept synthetic ones in order
    web_kept: bool
    kept_synthetic: list[int]  # indices into the sample's synthetic captions
    decision: str


def apply_caption_policy(
    policy: str, web_caption: str, web_passes: bool, synthetic: list[str], synthetic_passes: list[bool]
) -> CaptionChoice:
    """Keep the web caption and/or the passing synthetic ones, as `policy` says."""
    web_ok = bool(web_caption) and web_passes and policy != "synthetic"
    passing_synthetic = [i for i, (text, ok) in enumerate(zip(synthetic, synthetic_passes)) if ok and text]
    if policy == "web" or (policy == "web_else_synthetic" and web_ok):
        passing_synthetic = []
    kept = ([web_caption] if web_ok else []) + [synthetic[i] for i in passing_synthetic]
    if not kept:
        decision = "drop"
    elif web_ok and passing_synthetic:
        decision = "keep_web_and_synthetic"
    elif web_ok:
        decision = "keep_web"
    else:
        decision = "keep_synthetic"
    return CaptionChoice(kept=kept, web_kept=web_ok, kept_synthetic=passing_synthetic, decision=decision)
