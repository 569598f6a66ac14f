"""The demo's own CLIP: a small open_clip model trained on the demo's raw shards.

No pretrained CLIP can be downloaded here, so the demo trains one with open_clip's own
contrastive loss (`open_clip.ClipLoss`) on the image-caption pairs img2dataset fetched (web
noise included, as a real crawl has it), saves the state dict as a checkpoint file with its model
config beside it, and the processing stage loads it exactly like any pretrained checkpoint:
`open_clip.create_model_and_transforms("vlpdist-demo-clip", pretrained=<file>)`.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from data_ingest.download import list_raw_shards
from vlpdist.atomic import atomic_path
from vlpdist.config import Config
from vlpdist.errors import UserError

DEMO_CLIP_MODEL = "vlpdist-demo-clip"


def _load_pairs(shards: list[Path], preprocess, max_pixels: int):
    """Every usable (image tensor, caption) pair in `shards`, in key order, read as the processing stage reads them."""
    import torch

    from data_ingest.process.shard import read_inputs

    pairs = [(preprocess(image), caption) for shard in shards
             for _, image, caption in read_inputs(shard, captioner_on=False, max_pixels=max_pixels)[0]]
    return torch.stack([image for image, _ in pairs]), [caption for _, caption in pairs]


def training_raw_shards(config: Config) -> list[Path]:
    """The raw shards whose feature shards training will read: all but the last `train.heldout_shards`.

    The demo CLIP never sees the held-out images, so the held-out caption metrics measure images
    new to every model in the chain (and the filter's score on them, CLIP's generalisation).
    """
    from vlpdist.data.feature_shards import split_heldout

    return split_heldout(list_raw_shards(config), config.train.heldout_shards)[0]


def _random_shift(images_BCHW, max_shift: int):
    """Each image moved by up to `max_shift` pixels each way (edges replicated).

    Small shifts only: flips would swap left and right, and colour jitter would change colours,
    both of which the captions state.
    """
    import torch
    import torch.nn.functional as F

    _, _, height, width = images_BCHW.shape
    padded = F.pad(images_BCHW, (max_shift,) * 4, mode="replicate")  # (B, 3, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images_BCHW), 2)).tolist()
    return torch.stack([image[:, dy : dy + height, dx : dx + width] for image, (dy, dx) in zip(padded, offsets)])


def _drop_worst_pairs(model, images_BCHW, tokens_BL, fraction: float):
    """Indices of the pairs the half-trained model scores above the `fraction` quantile.

    BLIP's bootstrapping in miniature: web noise (mismatched captions) scores lowest once the model
    has learnt the clean majority, and training on without it stops the model memorising it.
    """
    import torch

    model.eval()
    with torch.no_grad():
        scores = torch.cat([
            (model.encode_image(images_BCHW[i : i + 256], normalize=True)
             * model.encode_text(tokens_BL[i : i + 256], normalize=True)).sum(dim=1)
            for i in range(0, len(tokens_BL), 256)
        ])  # (N,) cosine of each image with its own caption
    return torch.nonzero(scores > torch.quantile(scores, fraction)).squeeze(1)


def train_demo_clip(config: Config) -> Path:
    """Train the demo CLIP on `<root>/raw` (training shards only) and save it to `process.clip_pretrained`; returns that path."""
    import open_clip
    import torch
    from tqdm import tqdm

    from data_ingest.process.clip_model import SHIPPED_CLIP_CONFIG_DIR, register_clip_configs

    process = config.process
    if not process.clip_pretrained:
        raise UserError("config key 'process.clip_pretrained' must name the demo CLIP checkpoint file to write")
    checkpoint = Path(process.clip_pretrained)
    started = time.time()
    torch.manual_seed(config.demo.seed)
    register_clip_configs(process.clip_model, "")
    model, _, preprocess_eval = open_clip.create_model_and_transforms(process.clip_model)
    tokenizer = open_clip.get_tokenizer(process.clip_model)
    # Images are already at the model's size; the eval transform (no random crops) keeps the
    # left/right layout the captions talk about.
    images_BCHW, captions = _load_pairs(training_raw_shards(config), preprocess_eval, process.max_image_pixels)
    tokens_BL = tokenizer(captions)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=process.demo_clip_lr, weight_decay=0.1)
    steps_per_epoch = math.ceil(len(captions) / process.demo_clip_batch_size)
    total_steps = steps_per_epoch * process.demo_clip_epochs
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )
    train_pairs = torch.arange(len(captions))
    loss = torch.tensor(float("nan"))
    epochs = tqdm(range(process.demo_clip_epochs), desc="demo CLIP", unit="epoch")
    for epoch in epochs:
        if epoch == process.demo_clip_epochs // 2 and process.demo_clip_clean_fraction > 0:
            train_pairs = _drop_worst_pairs(model, images_BCHW, tokens_BL, process.demo_clip_clean_fraction)
        model.train()
        order = train_pairs[torch.randperm(len(train_pairs))]
        for start in range(0, len(order), process.demo_clip_batch_size):
            batch = order[start : start + process.demo_clip_batch_size]
            if len(batch) < 2:
                continue
            images = _random_shift(images_BCHW[batch], max_shift=4)  # (B, 3, H, W)
            image_features, text_features, logit_scale = model(images, tokens_BL[batch])
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        epochs.set_postfix(loss=f"{loss.item():.3f}", pairs=len(train_pairs))
    with atomic_path(checkpoint) as staging:
        torch.save(model.state_dict(), staging)
        shutil.copyfile(SHIPPED_CLIP_CONFIG_DIR / f"{process.clip_model}.json", checkpoint.parent / f"{process.clip_model}.json")
    print(
        f"[demo_clip] trained {process.clip_model} on {len(captions)} pairs ({len(train_pairs)} after cleaning), "
        f"{process.demo_clip_epochs} epochs, "
        f"final loss {loss.item():.3f}, {time.time() - started:.0f} s -> {checkpoint}",
        flush=True,
    )
    return checkpoint
