"""The captioner's alignment parts: bottleneck tokens behind a 4-D attention mask, and the
projection heads / text features ITC and SupCon use. Tiny GPT-2s built locally, loaded through
`from_pretrained` like a real checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from data_ingest.sources.demo_lm import make_demo_lm
from vlpdist.config import AlignConfig, DemoDataConfig, ModelConfig
from data_ingest.sources.synthetic import generate_demo_samples
from vlpdist.models.captioner import (
    additive_mask,
    bottleneck_attention_allowed,
    build_captioner,
)

CLIP_DIM = 16


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [sample.true_caption for sample in generate_demo_samples(DemoDataConfig(num_samples=80, seed=2))]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-layer", "2-layer"])
def lm_dir(request, tmp_path_factory, captions):
    folder = tmp_path_factory.mktemp(f"lm{request.param}") / "lm"
    return str(make_demo_lm(folder, captions, width=32, layers=request.param, heads=2, steps=20, batch_size=16)), request.param


def bottleneck_cfg(lm: str, only: bool = True) -> ModelConfig:
    return ModelConfig(lm_name=lm, mapper="mlp", prefix_length=3, max_caption_tokens=10, bottleneck_tokens=2, bottleneck_only=only)


def caption_logits(captioner, clip_BC, input_ids_BT, attention_mask_BT, prefix_shift=0.0) -> torch.Tensor:
    """Logits at the caption positions (B, T, V), with `prefix_shift` (B, P, D) added to the prefix
    embeddings (random, not constant: the LM's LayerNorm would remove a constant shift)."""
    prefix_BPD, _, _ = captioner.map_prefix(clip_BC)
    start_BSD = captioner.start_embeddings(prefix_BPD + prefix_shift)
    embeds = torch.cat([start_BSD, captioner.lm.get_input_embeddings()(input_ids_BT)], dim=1)
    start_len = start_BSD.shape[1]
    if captioner.bottleneck_only:
        mask = additive_mask(bottleneck_attention_allowed(captioner.prefix_length, start_len - captioner.prefix_length, attention_mask_BT), embeds.dtype)
    else:
        mask = torch.cat([attention_mask_BT.new_ones(len(clip_BC), start_len), attention_mask_BT], dim=1)
    return captioner.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, start_len:]


def test_caption_reaches_the_prefix_only_through_the_bottleneck(lm_dir, captions):
    lm, layers = lm_dir
    torch.manual_seed(0)
    only = build_captioner(bottleneck_cfg(lm, only=True), CLIP_DIM).eval()
    free = build_captioner(bottleneck_cfg(lm, only=False), CLIP_DIM).eval()
    free.load_state_dict(only.state_dict())
    ids_BT, mask_BT = only.tokenize(captions[:4])
    clip_BC = torch.randn(4, CLIP_DIM)
    with torch.no_grad():
        for captioner in (only, free):
            base = caption_logits(captioner, clip_BC, ids_BT, mask_BT)
            moved = caption_logits(captioner, clip_BC, ids_BT, mask_BT, prefix_shift=torch.randn(4, 3, 32))
            change = (moved - base).abs().max().item()
            if captioner is free or layers > 1:
                # Without the mask the caption reads the prefix directly; with two layers it reads
                # it through the bottleneck tokens' first-layer states.
                assert change > 1e-3
            else:
                # One layer: caption keys/values at the bottleneck positions are the bottleneck
                # tokens' own embeddings, so nothing of the prefix can arrive.
                assert change == 0.0


def test_bottleneck_gradient_path(lm_dir, captions):
    """The prefix's gradient from the caption loss is zero when the bottleneck
    positions' path is cut (their hidden states detached after every block: the last bottleneck
    position predicts the first caption token, so it is part of the path), and non-zero when it is not."""
    lm, _ = lm_dir
    torch.manual_seed(0)
    captioner = build_captioner(bottleneck_cfg(lm), CLIP_DIM).eval()
    ids_BT, mask_BT = captioner.tokenize(captions[:3])
    prefix_BPD = torch.randn(3, 3, 32, requires_grad=True)
    cut = {"on": False}

    def detach_bottleneck(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if not cut["on"]:
            return output
        hidden = torch.cat([hidden[:, :3], hidden[:, 3:5].detach(), hidden[:, 5:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [block.register_forward_hook(detach_bottleneck) for block in captioner.lm.transformer.h]
    try:
        grads = {}
        for state in (False, True):
            cut["on"] = state
            prefix_BPD.grad = None
            captioner.caption_loss_after(captioner.start_embeddings(prefix_BPD), ids_BT, mask_BT).backward()
            grads[state] = prefix_BPD.grad.abs().max().item()
    finally:
        for handle in handles:
            handle.remove()
    # Cut: what is left of the prefix's influence runs through prefix positions only, which no
    # caption position can attend to and which carry no label, so it is exactly zero.
    assert grads[True] == 0.0
    assert grads[False] > 0.0


@pytest.mark.parametrize("cache_argument", ["as_installed", "past_key_values"])
def test_bottleneck_greedy_generation_matches_the_training_mask(lm_dir, cache_argument, monkeypatch):
    """Greedy tokens from `generate` (cache + masked prefix) equal the argmax chain of the
    training-time 4-D-mask forward: decoding sees the prefix exactly as training does. Also with
    the cache handed over as `past_key_values`, as transformers releases before `cache` take it
    (the installed one still accepts the old name)."""
    import vlpdist.models.captioner as captioner_module

    if cache_argument != "as_installed":
        monkeypatch.setattr(captioner_module, "lm_cache_argument", lambda lm: cache_argument)
    lm, _ = lm_dir
    torch.manual_seed(1)
    captioner = build_captioner(bottleneck_cfg(lm), CLIP_DIM).eval()
    clip_BC = torch.randn(2, CLIP_DIM)
    new_tokens = 5
    texts = captioner.generate_captions(clip_BC, max_new_tokens=new_tokens)
    with torch.no_grad():
        ids = torch.empty(2, 0, dtype=torch.long)
        for _ in range(new_tokens):
            mask = torch.ones_like(ids)
            prefix_BPD, _, _ = captioner.map_prefix(clip_BC)
            start = captioner.start_embeddings(prefix_BPD)
            embeds = torch.cat([start, captioner.lm.get_input_embeddings()(ids)], dim=1)
            allowed = bottleneck_attention_allowed(3, 2, mask)
            logits = captioner.lm(inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    expected = []
    for row in ids.tolist():
        eos = captioner.tokenizer.eos_token_id
        row = row[: row.index(eos)] if eos in row else row
        expected.append(captioner.tokenizer.decode(row, skip_special_tokens=True).strip())
    assert texts == expected


def test_alignment_heads_and_lm_text_features(lm_dir, captions):
    lm, _ = lm_dir
    align = AlignConfig(itc_weight=1.0, embed_dim=8)
    captioner = build_captioner(ModelConfig(lm_name=lm, mapper="mlp", prefix_length=3, max_caption_tokens=10), CLIP_DIM, align=align)
    ids_BT, mask_BT = captioner.tokenize(captions[:4])
    out = captioner(torch.randn(4, CLIP_DIM), ids_BT, mask_BT)
    assert out["visual_embed"].shape == (4, 8) and out["text_embed"].shape == (4, 8)
    assert torch.allclose(out["visual_embed"].norm(dim=1), torch.ones(4)) and torch.allclose(out["text_embed"].norm(dim=1), torch.ones(4))
    assert not out["text_feature"].requires_grad  # frozen LM: the text side carries no LM gradient
    assert out["text_embed"].requires_grad  # ... but the text projection head trains
    # Padding does not change a caption's text feature: the same caption alone and in a padded batch.
    alone_ids, alone_mask = captioner.tokenize(captions[:1])
    alone = captioner.lm_text_features(alone_ids, alone_mask)
    assert torch.allclose(alone[0], out["text_feature"][0], atol=1e-5)
    assert out["itc_temperature"].detach().item() == pytest.approx(align.temperature_init)
    tuned = build_captioner(dataclasses.replace(captioner_cfg := ModelConfig(lm_name=lm, mapper="mlp", prefix_length=3), freeze_lm=False),
                            CLIP_DIM, align=align)
    assert captioner_cfg.freeze_lm and tuned(torch.randn(2, CLIP_DIM), *tuned.tokenize(captions[:2]))["text_feature"].requires_grad
    clip_target = build_captioner(ModelConfig(lm_name=lm, mapper="mlp", prefix_length=3), CLIP_DIM,
                                  align=dataclasses.replace(align, text_target="clip"))
    out = clip_target(torch.randn(2, CLIP_DIM), *clip_target.tokenize(captions[:2]), torch.randn(2, CLIP_DIM))
    assert out["text_embed"].shape == (2, 8)
