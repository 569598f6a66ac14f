"""Prefix-LM captioner (ClipCap): mapper(CLIP) -> P prefix embeddings -> `[prefix | caption]` -> causal LM.

Any Hugging Face causal LM loads by hub name ("gpt2") or local folder through the same
`from_pretrained` call; the tokenizer likewise. Offline, a hub name can half-load into a tokenizer
that encodes everything to nothing, so `check_tokenizer` refuses empty vocabularies and empty
encodings of a probe sentence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from vlpdist.config import ModelConfig
from vlpdist.errors import UserError
from vlpdist.models.expert_state import global_to_local_expert_state, local_to_global_expert_state
from vlpdist.models.mapper import build_mapper

IGNORE_INDEX = -100  # Hugging Face's label value for "no loss here" (the prefix, the padding)
PROBE_SENTENCE = "a dog runs on the grass."


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a tokenizer with no ordinary vocabulary, no EOS, or that encodes a probe sentence to nothing."""
    ordinary = set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens)
    if not ordinary:
        raise UserError(f"tokenizer {name!r} has an empty vocabulary (a failed offline load?); give a local tokenizer folder")
    if not tokenizer(PROBE_SENTENCE, add_special_tokens=False)["input_ids"]:
        raise UserError(f"tokenizer {name!r} encodes {PROBE_SENTENCE!r} to nothing (a failed offline load?)")
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {name!r} has no EOS token; captions need one to end")


def load_tokenizer(name: str):
    """A Hugging Face tokenizer by hub name or local folder, checked, with PAD falling back to EOS (GPT-2 has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer {name!r}: {str(err).splitlines()[0]}") from None
    check_tokenizer(tokenizer, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_language_model(name: str) -> nn.Module:
    """A Hugging Face causal LM by hub name or local folder (saved with `save_pretrained`)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load language model {name!r}: {str(err).splitlines()[0]}") from None


def tokenize_captions(tokenizer, max_caption_tokens: int, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids (B, T), attention_mask (B, T)): EOS appended, truncated to
    `max_caption_tokens`, right-padded. A plain function, so loader workers can run it."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    rows = [ids[: max_caption_tokens - 1] + [tokenizer.eos_token_id] for ids in encoded]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


class PrefixCaptioner(nn.Module):
    """mapper + causal LM + tokenizer; `forward` returns the named loss terms the training loop sums and logs."""

    def __init__(self, mapper: nn.Module, lm: nn.Module, tokenizer, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.mapper = mapper
        self.lm = lm
        self.tokenizer = tokenizer
        self.prefix_length = cfg.prefix_length
        self.max_caption_tokens = cfg.max_caption_tokens
        self.moe_aux_weight = cfg.moe_aux_weight
        self.freeze_lm = cfg.freeze_lm
        self.experts_per_rank = cfg.num_experts // ep_size
        self.lm.requires_grad_(not cfg.freeze_lm)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids (B, T), attention_mask (B, T)): see `tokenize_captions`."""
        return tokenize_captions(self.tokenizer, self.max_caption_tokens, captions)

    def map_prefix(self, clip_emb_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix_BPD in the LM's dtype, moe_aux, expert_load_E)."""
        mapper_dtype = next(self.mapper.parameters()).dtype
        prefix_BPD, moe_aux, load_E = self.mapper(clip_emb_BC.to(mapper_dtype))
        return prefix_BPD.to(self.lm.get_input_embeddings().weight.dtype), moe_aux, load_E

    def forward(
        self, clip_emb_BC: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms: `cap` (next-token CE on caption tokens only), `moe_aux`, their weighted sum `loss`;
        also `expert_load` ((E,) fraction of samples per expert, empty without MoE) and `prefix` (B, P, D)."""
        prefix_BPD, moe_aux, load_E = self.map_prefix(clip_emb_BC)
        cap = self.caption_loss_after(prefix_BPD, input_ids_BT, attention_mask_BT)
        return {
            "loss": cap + self.moe_aux_weight * moe_aux,
            "cap": cap,
            "moe_aux": moe_aux,
            "expert_load": load_E,
            "prefix": prefix_BPD,
        }

    def caption_loss_after(
        self, start_BSD: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, lm: nn.Module | None = None
    ) -> torch.Tensor:
        """The LM's (or `lm`'s) caption cross-entropy after the S start embeddings `start_BSD` (B, S, D)."""
        lm = self.lm if lm is None else lm
        batch, start_len = start_BSD.shape[:2]
        tokens_BTD = lm.get_input_embeddings()(input_ids_BT)
        embeds = torch.cat([start_BSD, tokens_BTD], dim=1)  # (B, S+T, D)
        mask = torch.cat([attention_mask_BT.new_ones(batch, start_len), attention_mask_BT], dim=1)
        labels = torch.cat(
            [input_ids_BT.new_full((batch, start_len), IGNORE_INDEX), input_ids_BT.masked_fill(attention_mask_BT == 0, IGNORE_INDEX)],
            dim=1,
        )
        # The LM shifts labels itself: position t predicts token t+1, so the last start position predicts the first caption token.
        return lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    def text_only_caption_loss(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, lm: nn.Module | None = None
    ) -> torch.Tensor:
        """Baseline 'LM without the image': caption CE after the LM's BOS token (an all-zeros prefix if it has none).

        `lm` replaces this captioner's LM for the baseline: when the LM was tuned with the mapper,
        the fair baseline is the LM as it was before (a tuned LM has learnt to expect a prefix).
        """
        lm = self.lm if lm is None else lm
        batch = input_ids_BT.shape[0]
        embed = lm.get_input_embeddings()
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            start_BSD = embed(input_ids_BT.new_full((batch, 1), bos))
        else:
            start_BSD = embed.weight.new_zeros(batch, self.prefix_length, embed.embedding_dim)
        return self.caption_loss_after(start_BSD, input_ids_BT, attention_mask_BT, lm)

    @torch.no_grad()
    def generate_captions(self, clip_emb_BC: torch.Tensor, max_new_tokens: int, num_beams: int = 1) -> list[str]:
        """Greedy (num_beams=1) or beam-search captions through Hugging Face `generate` with `inputs_embeds`."""
        was_training = self.training
        self.eval()
        try:
            prefix_BPD, _, _ = self.map_prefix(clip_emb_BC)
            generated = self.lm.generate(
                inputs_embeds=prefix_BPD,
                attention_mask=torch.ones(prefix_BPD.shape[:2], dtype=torch.long, device=prefix_BPD.device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        finally:
            self.train(was_training)
        # With only inputs_embeds, decoder-only `generate` returns just the new tokens.
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def global_state_dict(self, ep_rank: int) -> dict[str, torch.Tensor]:
        """This rank's state with expert params renamed to global ids (gather all ranks' to consolidate)."""
        return local_to_global_expert_state(self.state_dict(), ep_rank, self.experts_per_rank)

    def load_consolidated_state(self, state: Mapping[str, torch.Tensor], ep_rank: int = 0) -> None:
        """Load a consolidated state (all experts by global id) into this rank's share of the experts.

        The LM's weights may be absent when the LM is frozen (they come from `lm_name`)."""
        local = global_to_local_expert_state(dict(state), ep_rank, self.experts_per_rank)
        try:
            result = self.load_state_dict(local, strict=False)
        except RuntimeError as err:
            raise UserError(f"consolidated state does not fit this model config: {str(err).splitlines()[-1].strip()}") from None
        missing = [key for key in result.missing_keys if not (self.freeze_lm and key.startswith("lm."))]
        if missing or result.unexpected_keys:
            raise UserError(
                f"consolidated state does not fit this model config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )


def load_language_model_and_tokenizer(model_cfg: ModelConfig) -> tuple[nn.Module, object]:
    """The configured LM and its (checked) tokenizer, refusing a tokenizer larger than the LM's vocabulary."""
    tokenizer = load_tokenizer(model_cfg.tokenizer_name or model_cfg.lm_name)
    lm = load_language_model(model_cfg.lm_name)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        raise UserError(
            f"tokenizer has {len(tokenizer)} tokens but LM {model_cfg.lm_name!r} embeds only {lm.get_input_embeddings().num_embeddings}"
        )
    return lm, tokenizer


def build_captioner(
    model_cfg: ModelConfig,
    clip_dim: int,
    ep_size: int = 1,
    *,
    consolidated_state: Mapping[str, torch.Tensor] | None = None,
    ep_rank: int = 0,
) -> PrefixCaptioner:
    """LM + tokenizer by name/folder, the configured mapper (its experts spread over `ep_size` ranks),
    optionally loaded from a consolidated state dict (any ep_size; `ep_rank` picks this rank's experts)."""
    lm, tokenizer = load_language_model_and_tokenizer(model_cfg)
    mapper = build_mapper(model_cfg, clip_dim, lm.get_input_embeddings().embedding_dim, ep_size)
    captioner = PrefixCaptioner(mapper, lm, tokenizer, model_cfg, ep_size)
    if consolidated_state is not None:
        captioner.load_consolidated_state(consolidated_state, ep_rank)
    return captioner


def load_exported_captioner(export_dir: str | Path) -> PrefixCaptioner:
    """The inference captioner: the folded mapper `launcher.export` wrote, with the LM and tokenizer its config names."""
    from vlpdist.models.fold import FOLDED_CONFIG_FILE, load_folded_mapper

    folded = load_folded_mapper(export_dir)
    model_cfg = ModelConfig(**json.loads((Path(export_dir) / FOLDED_CONFIG_FILE).read_text())["model"])
    lm, tokenizer = load_language_model_and_tokenizer(model_cfg)
    return PrefixCaptioner(folded, lm, tokenizer, model_cfg).eval()
