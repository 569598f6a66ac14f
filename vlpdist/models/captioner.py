"""Prefix-LM captioner (ClipCap): mapper(CLIP) -> P prefix embeddings -> `[prefix | caption]` -> causal LM.

Any Hugging Face causal LM loads by hub name ("gpt2") or local folder through the same
`from_pretrained` call; the tokenizer likewise. Offline, a hub name can half-load into a tokenizer
that encodes everything to nothing, so `check_tokenizer` refuses empty vocabularies and empty
encodings of a probe sentence.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlpdist.config import AlignConfig, ModelConfig
from vlpdist.errors import UserError
from vlpdist.models.mapper import build_mapper
from vlpdist.parallel.expert_state import global_to_local_expert_state, local_to_global_expert_state

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


def at_revision(name: str, revision: str | None) -> str:
    """`name`, and the revision when one is pinned, for messages."""
    return f"{name!r} at revision {revision}" if revision else repr(name)


def load_tokenizer(name: str, revision: str | None = None):
    """A Hugging Face tokenizer by hub name or local folder, checked, with PAD falling back to EOS (GPT-2 has none).

    `revision`: the hub commit to load (an export pins the one it was trained with); a local folder has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer {at_revision(name, revision)}: {str(err).splitlines()[0]}") from None
    check_tokenizer(tokenizer, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_language_model(name: str, revision: str | None = None) -> nn.Module:
    """A Hugging Face causal LM by hub name or local folder (saved with `save_pretrained`), at the hub
    commit `revision` when given (None: the hub's, or offline the cache's, `main`)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load language model {at_revision(name, revision)}: {str(err).splitlines()[0]}") from None


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


def tokenize_lm_inputs(
    tokenizer, max_caption_tokens: int, max_answer_tokens: int, question_template: str,
    captions: list[str], questions: list[str | None] | None = None, answers: list[str | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed caption and question samples -> what the LM reads after the start embeddings:
    (input_ids (B, T), attention_mask (B, T), target_mask (B, T)), right-padded.

    A caption sample (question None) is its caption + EOS, every token a target (as
    `tokenize_captions`). A question sample is `format_question_prompt(template, question)` (cut to
    max_caption_tokens, keeping its end) then " " + answer + EOS (cut to max_answer_tokens): only the answer tokens
    are targets, so the loss never falls on the prompt. A plain function, so loader workers run it."""
    from vlpdist.data.question_answer import format_question_prompt

    questions = questions or [None] * len(captions)
    answers = answers or [None] * len(captions)
    eos = tokenizer.eos_token_id
    rows: list[tuple[list[int], int]] = []  # (ids, number of leading non-target tokens)
    for caption, question, answer in zip(captions, questions, answers):
        if question is None:
            ids = tokenizer(caption, add_special_tokens=False)["input_ids"][: max_caption_tokens - 1] + [eos]
            rows.append((ids, 0))
            continue
        prompt = tokenizer(format_question_prompt(question_template, question), add_special_tokens=False)["input_ids"]
        # A leading space: the answer is a new word after the prompt's last one (GPT-2's BPE marks that).
        target = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"][: max_answer_tokens - 1] + [eos]
        prompt = prompt[-max_caption_tokens:]  # a long question loses its start, never the template's cue before the answer
        rows.append((prompt + target, len(prompt)))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    target_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        target_mask[i, prompt_len : len(ids)] = 1
    return input_ids, attention_mask, target_mask


def tokenize_prompts(tokenizer, max_prompt_tokens: int, question_template: str, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions -> their prompts as (input_ids (B, T), attention_mask (B, T)), LEFT-padded, so that
    every row's last prompt token sits at the end, where generation continues (the padding then lies
    between the start embeddings and the prompt; positions come from the mask, as in training)."""
    from vlpdist.data.question_answer import format_question_prompt

    rows = [tokenizer(format_question_prompt(question_template, question), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
            for question in questions]  # cut as in training (`tokenize_lm_inputs`)
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, length - len(row):] = torch.tensor(row)
            attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


class AlignmentHeads(nn.Module):
    """Projection heads into the shared alignment space (ITC, SupCon) and the learnable ITC temperature.

    visual: mean over the P prefix tokens (B, P, D) -> Linear(D, E) -> unit norm (B, E);
    text: a caption's text feature (B, Dt) -> Linear(Dt, E) -> unit norm (B, E)."""

    def __init__(self, prefix_width: int, text_width: int, align: AlignConfig):
        super().__init__()
        self.visual = nn.Linear(prefix_width, align.embed_dim)
        self.text = nn.Linear(text_width, align.embed_dim)
        # Shape (1,), not 0-dim: DeepSpeed's parameter broadcast views every parameter as bytes.
        self.log_temperature = nn.Parameter(torch.tensor([math.log(align.temperature_init)]), requires_grad=align.learn_temperature)
        self.temperature_bounds = (align.temperature_min, align.temperature_max)

    # The heads compute in fp32 whatever the engine cast their weights to (bf16 on GPUs): the
    # embeddings feed softmaxes over 65k keys, a bank kept in fp32 and geodesic distances.
    def visual_embed(self, prefix_BPD: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(_linear_fp32(self.visual, prefix_BPD.float().mean(dim=1)), dim=-1)

    def text_embed(self, text_BDt: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(_linear_fp32(self.text, text_BDt.float()), dim=-1)

    def temperature(self) -> torch.Tensor:
        """0-dim fp32. Not clamped here: a clamp in the forward has no gradient past a bound, and Adam's
        momentum would carry the parameter further out for good; `clamp_temperature_` bounds it instead."""
        return self.log_temperature.float().exp()[0]

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the log-temperature in place into its bounds; call after every applied optimizer step
        (as open_clip and ALBEF clamp their logit scale). At the bound the gradient still flows, so the
        temperature comes back as soon as the loss favours it.

        Under DeepSpeed ZeRO the optimizer steps an fp32 master copy and writes it over the module's
        parameter at the next step, so the master is clamped too: each rank clamps the fragment it
        owns (`_hp_mapping`, DeepSpeed's link from a parameter to its master fragment; a clamp is
        elementwise, so fragment-wise is the whole clamp). No collective, no host sync."""
        low, high = (math.log(bound) for bound in self.temperature_bounds)
        self.log_temperature.data.clamp_(low, high)
        master = getattr(self.log_temperature, "_hp_mapping", None)
        if master is not None:
            master.get_hp_fragment().data.clamp_(low, high)


def _linear_fp32(layer: nn.Linear, x_BI: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x_BI, layer.weight.float(), layer.bias.float() if layer.bias is not None else None)


def lm_supports_4d_attention_mask(lm: nn.Module) -> bool:
    """Whether `lm` obeys a custom 4-D additive attention mask: a probe forward where the last
    position is barred from the first must differ from the causal one, and a 4-D mask equal to the
    causal one must give the causal logits (an LM that rebuilds its own mask fails one of the two)."""
    device = lm.get_input_embeddings().weight.device
    width = lm.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 3, width, generator=generator).to(device, lm.get_input_embeddings().weight.dtype)
    with torch.no_grad():
        causal = lm(inputs_embeds=embeds, attention_mask=torch.ones(1, 3, dtype=torch.long, device=device)).logits
        allowed = torch.ones(3, 3, dtype=torch.bool, device=device).tril()
        same = lm(inputs_embeds=embeds, attention_mask=additive_mask(allowed[None], embeds.dtype)).logits
        allowed[2, 0] = False
        barred = lm(inputs_embeds=embeds, attention_mask=additive_mask(allowed[None], embeds.dtype)).logits
    return torch.allclose(causal, same, atol=1e-5) and not torch.allclose(causal[0, 2], barred[0, 2], atol=1e-6)


def lm_keeps_chosen_logits(lm: nn.Module) -> bool:
    """Whether the LM's forward takes `logits_to_keep` (transformers >= 4.50's causal LMs), so the
    head runs only at the positions given."""
    return _forward_takes_logits_to_keep(type(lm))


@functools.cache
def _forward_takes_logits_to_keep(lm_class: type) -> bool:
    # Per class, once: the caption loss asks at every training step.
    return "logits_to_keep" in inspect.signature(lm_class.forward).parameters


def lm_cache_argument(lm: nn.Module) -> str:
    """The name under which the LM's forward and `generate` take a KV cache, and its outputs return
    it: `cache` in the transformers releases that renamed it, `past_key_values` before them."""
    return _cache_argument(type(lm))


@functools.cache
def _cache_argument(lm_class: type) -> str:
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


def additive_mask(allowed_BQK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool "may attend" -> (B, 1, Q, K) additive mask (0 or the dtype's minimum), the form
    Hugging Face LMs take as a ready 4-D mask (eager adds it; sdpa accepts a float mask)."""
    return torch.zeros(allowed_BQK.shape, dtype=dtype, device=allowed_BQK.device).masked_fill(
        ~allowed_BQK, torch.finfo(dtype).min
    )[:, None]


def bottleneck_attention_allowed(prefix_len: int, bottleneck_len: int, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool, S = P + B + T: causal attention over `[prefix | bottleneck | caption]`, where
    caption positions may not attend to prefix positions (they see the prefix only through the
    bottleneck tokens), and padded caption keys are never attended to."""
    batch, caption_len = attention_mask_BT.shape
    start = prefix_len + bottleneck_len
    total = start + caption_len
    device = attention_mask_BT.device
    allowed_SS = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    allowed_SS[start:, :prefix_len] = False
    key_present_BS = torch.cat([attention_mask_BT.new_ones(batch, start), attention_mask_BT], dim=1).bool()
    allowed_BSS = allowed_SS[None] & key_present_BS[:, None, :]
    # A padded query with no key left would be all -inf (NaN in softmax): it may see itself; its output is ignored.
    return allowed_BSS | torch.eye(total, dtype=torch.bool, device=device)[None]


class PrefixCaptioner(nn.Module):
    """mapper + causal LM + tokenizer (+ optional bottleneck tokens and alignment heads);
    `forward` returns the named loss terms the training loop weights, sums and logs."""

    def __init__(self, mapper: nn.Module, lm: nn.Module, tokenizer, cfg: ModelConfig, ep_size: int = 1,
                 align: AlignConfig | None = None, clip_dim: int = 0):
        super().__init__()
        self.mapper = mapper
        self.lm = lm
        self.tokenizer = tokenizer
        self.prefix_length = cfg.prefix_length
        self.max_caption_tokens = cfg.max_caption_tokens
        self.max_answer_tokens = cfg.max_answer_tokens
        self.question_template = cfg.question_template
        self.freeze_lm = cfg.freeze_lm
        self.experts_per_rank = cfg.num_experts // ep_size
        self.lm.requires_grad_(not cfg.freeze_lm)
        width = lm.get_input_embeddings().embedding_dim
        self.bottleneck_only = cfg.bottleneck_only and cfg.bottleneck_tokens > 0
        self.bottleneck = nn.Parameter(0.02 * torch.randn(cfg.bottleneck_tokens, width)) if cfg.bottleneck_tokens else None
        if self.bottleneck_only and not lm_supports_4d_attention_mask(lm):
            raise UserError(
                f"model.bottleneck_only needs an LM that obeys 4-D attention masks; {type(lm).__name__} does not "
                "(Hugging Face GPT-2, Llama, Mistral, Qwen2 and other models built on transformers' masking_utils do)"
            )
        self.text_target = align.text_target if align is not None and align.enabled else ""
        self.heads = None
        if self.text_target:
            self.heads = AlignmentHeads(width, clip_dim if self.text_target == "clip" else width, align)
        # Training-mode callables from `compile_for_training`, kept in a plain dict so they are not
        # submodules: state_dict names, checkpoints and the momentum copy of the mapper stay as they are.
        self._compiled: dict[str, nn.Module] = {}
        # `from_pretrained` hands the LM over in eval mode; the captioner starts in train mode as a
        # whole (a tuned LM with its dropout, a frozen one without, see `train`).
        self.train(self.training)

    def train(self, mode: bool = True) -> "PrefixCaptioner":
        """As `nn.Module.train`, except that a frozen LM always stays in eval mode (ClipCap's frozen
        GPT-2 does): no dropout in the caption loss, and text features that depend on the caption
        alone, so `lm_cached` keeps the LM's feature, not one dropout draw of it. The engine's
        `train()`/`eval()` and the restore after generation and evaluation all come through here."""
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()
        return self

    def compile_for_training(self, **options) -> list[str]:
        """`torch.compile` the LM and the mapper for the training forward (`self.training` only).
        Held-out scoring and `generate` keep the eager modules: decoding changes the sequence length
        every token, which would recompile. Returns the names of what was compiled."""
        self._compiled = {"lm": torch.compile(self.lm, **options), "mapper": torch.compile(self.mapper, **options)}
        return list(self._compiled)

    def _training_callable(self, name: str, module: nn.Module) -> nn.Module:
        return self._compiled.get(name, module) if self.training else module

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids (B, T), attention_mask (B, T)): see `tokenize_captions`."""
        return tokenize_captions(self.tokenizer, self.max_caption_tokens, captions)

    def map_prefix(self, clip_emb_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix_BPD in the LM's dtype, moe_aux, expert_load_E)."""
        mapper_dtype = next(self.mapper.parameters()).dtype
        prefix_BPD, moe_aux, load_E = self._training_callable("mapper", self.mapper)(clip_emb_BC.to(mapper_dtype))
        return prefix_BPD.to(self.lm.get_input_embeddings().weight.dtype), moe_aux, load_E

    def start_embeddings(self, prefix_BPD: torch.Tensor) -> torch.Tensor:
        """What the caption follows: the prefix, then the bottleneck tokens if any: (B, P + B, D)."""
        if self.bottleneck is None:
            return prefix_BPD
        tokens_BND = self.bottleneck.to(prefix_BPD.dtype)[None].expand(prefix_BPD.shape[0], -1, -1)
        return torch.cat([prefix_BPD, tokens_BND], dim=1)

    def lm_text_features(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states of the caption alone through the LM's body (no LM head): (B, D).
        Without gradient when the LM is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_lm):
            hidden_BTD = self.lm.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
            weights_BT1 = attention_mask_BT[..., None].to(hidden_BTD.dtype)
            return (hidden_BTD * weights_BT1).sum(dim=1) / weights_BT1.sum(dim=1).clamp(min=1)

    def forward(
        self, clip_emb_BC: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
        text_feature_BDt: torch.Tensor | None = None, target_mask_BT: torch.Tensor | None = None,
        is_question_B: torch.Tensor | None = None, text_ids_BT: torch.Tensor | None = None,
        text_mask_BT: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms `cap` (next-token CE over the caption samples' tokens), `ans` (over the question
        samples' answer tokens only; 0 in a micro-batch without questions) and `moe_aux`,
        `expert_load` ((E,) fraction of samples per expert, empty without MoE) and `prefix` (B, P, D);
        with alignment heads also `visual_embed` / `text_embed` (B, E) unit-norm, `text_feature` (B, Dt)
        and the term `itc_temperature`.

        `input_ids_BT` / `attention_mask_BT` are what the LM reads after the start embeddings
        (`tokenize_lm_inputs`); `target_mask_BT` marks the tokens predicted with a loss (default: all
        real tokens, i.e. captions) and `is_question_B` (B,) bool the question rows. The alignment text
        (`text_ids_BT` / `text_mask_BT`, default the LM input) feeds the LM text features; a
        `text_feature_BDt` (a cached LM feature or the CLIP text embedding) replaces that forward."""
        prefix_BPD, moe_aux, load_E = self.map_prefix(clip_emb_BC)
        target_mask_BT = attention_mask_BT if target_mask_BT is None else target_mask_BT
        losses_BT = self.token_losses_after(self.start_embeddings(prefix_BPD), input_ids_BT, attention_mask_BT, target_mask_BT)
        targets_BT = target_mask_BT.to(losses_BT.dtype)
        question_B1 = (torch.zeros(len(input_ids_BT), dtype=torch.bool, device=input_ids_BT.device)
                       if is_question_B is None else is_question_B.to(input_ids_BT.device).bool())[:, None]
        caption_targets_BT, answer_targets_BT = targets_BT * ~question_B1, targets_BT * question_B1
        # Token means within each task, as Hugging Face's causal-LM loss; an empty task contributes 0.
        cap = (losses_BT * caption_targets_BT).sum() / caption_targets_BT.sum().clamp(min=1)
        ans = (losses_BT * answer_targets_BT).sum() / answer_targets_BT.sum().clamp(min=1)
        out = {"cap": cap, "ans": ans, "moe_aux": moe_aux, "expert_load": load_E, "prefix": prefix_BPD}
        if self.heads is not None:
            if text_feature_BDt is None:
                if self.text_target == "clip":
                    raise ValueError("text_target clip: pass the batch's CLIP text embeddings as text_feature_BDt")
                if text_ids_BT is None:
                    text_ids_BT, text_mask_BT = input_ids_BT, attention_mask_BT
                text_feature_BDt = self.lm_text_features(text_ids_BT, text_mask_BT)
            out["visual_embed"] = self.heads.visual_embed(prefix_BPD)
            out["text_feature"] = text_feature_BDt
            out["text_embed"] = self.heads.text_embed(text_feature_BDt)
            out["itc_temperature"] = self.heads.temperature()
        return out

    def caption_loss_after(
        self, start_BSD: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, lm: nn.Module | None = None,
        target_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LM's (or `lm`'s) mean cross-entropy over the target tokens (default: every real token)
        after the S start embeddings `start_BSD` (B, S, D) (in bottleneck mode the last B of them are
        the bottleneck tokens and a 4-D mask applies)."""
        target_mask_BT = attention_mask_BT if target_mask_BT is None else target_mask_BT
        losses_BT = self.token_losses_after(start_BSD, input_ids_BT, attention_mask_BT, target_mask_BT, lm)
        return losses_BT.sum() / target_mask_BT.sum().clamp(min=1).to(losses_BT.dtype)

    def token_losses_after(
        self, start_BSD: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
        target_mask_BT: torch.Tensor, lm: nn.Module | None = None,
    ) -> torch.Tensor:
        """(B, T) fp32 next-token cross-entropy of each token of `input_ids_BT` read after `start_BSD`,
        0 where `target_mask_BT` is 0 (prompt tokens and padding carry no loss)."""
        lm = self.lm if lm is None else lm
        run = self._training_callable("lm", lm) if lm is self.lm else lm
        batch, start_len = start_BSD.shape[:2]
        caption_len = input_ids_BT.shape[1]
        tokens_BTD = lm.get_input_embeddings()(input_ids_BT)
        embeds = torch.cat([start_BSD, tokens_BTD], dim=1)  # (B, S+T, D)
        if self.bottleneck_only and start_len > self.prefix_length:
            allowed = bottleneck_attention_allowed(self.prefix_length, start_len - self.prefix_length, attention_mask_BT)
            mask = additive_mask(allowed, embeds.dtype)
        else:
            mask = torch.cat([attention_mask_BT.new_ones(batch, start_len), attention_mask_BT], dim=1)
        targets_BT = input_ids_BT.masked_fill(target_mask_BT == 0, IGNORE_INDEX)
        # Position t predicts token t+1: the T positions S-1 .. S+T-2 predict the T tokens read after the start.
        if lm_keeps_chosen_logits(lm):
            # Logits only there: the LM head (D x V: 50,257 rows for GPT-2, ~30 % of its forward) then
            # skips the other S positions; padding rows are still computed and ignored by the loss.
            keep_T = torch.arange(start_len - 1, start_len + caption_len - 1, device=embeds.device)
            logits_BTV = run(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep_T).logits
        else:
            logits_BTV = run(inputs_embeds=embeds, attention_mask=mask).logits[:, start_len - 1 : start_len + caption_len - 1]
        # As Hugging Face's causal-LM loss: fp32 logits.
        losses = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view(batch, caption_len)

    def text_only_caption_loss(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, lm: nn.Module | None = None
    ) -> torch.Tensor:
        """Baseline 'LM without the image': caption CE after the LM's BOS token (an all-zeros prefix if it has none).

        `lm` replaces this captioner's LM for the baseline: when the LM was tuned with the mapper,
        the fair baseline is the LM as it was before (a tuned LM has learnt to expect a prefix).
        """
        lm = self.lm if lm is None else lm
        # At most P start embeddings: never the bottleneck mask (that needs more than P).
        return self.caption_loss_after(self.text_only_start(input_ids_BT.shape[0], lm), input_ids_BT, attention_mask_BT, lm)

    def text_only_start(self, batch: int, lm: nn.Module | None = None) -> torch.Tensor:
        """What the LM without the image reads first: its BOS embedding (B, 1, D), or an all-zeros
        prefix (B, P, D) when it has no BOS."""
        embed = (self.lm if lm is None else lm).get_input_embeddings()
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            return embed(torch.full((batch, 1), bos, dtype=torch.long, device=embed.weight.device))
        return embed.weight.new_zeros(batch, self.prefix_length, embed.embedding_dim)

    @torch.no_grad()
    def generate_answers(
        self, clip_emb_BC: torch.Tensor | None, prompts: list[str], max_new_tokens: int, num_beams: int = 1,
        apply_template: bool = True,
    ) -> list[str]:
        """Short answers to questions, greedy (num_beams=1) or by beam search, through Hugging Face
        `generate` with `inputs_embeds`: the input is `[prefix | bottleneck tokens | prompt]` as in
        training (`tokenize_lm_inputs`), and the answer is what the LM writes after the prompt.

        `prompts` are the questions, each put into this model's `question_template` (the one it was
        trained with, from the run's or the export's config); `apply_template=False` takes them as
        finished prompts. `clip_emb_BC=None` is the LM without the image (the baseline): the prompt
        follows the LM's BOS alone (no prefix, no bottleneck tokens). In bottleneck mode the answer
        decodes greedily, the prompt and answer reaching the prefix only through the bottleneck tokens."""
        from vlpdist.data.question_answer import format_question_prompt

        texts = [format_question_prompt(self.question_template, p) if apply_template else p for p in prompts]
        prompt_ids_BT, prompt_mask_BT = tokenize_prompts(self.tokenizer, self.max_caption_tokens, "{question}", texts)
        was_training = self.training
        self.eval()
        try:
            if clip_emb_BC is None:
                start_BSD = self.text_only_start(len(texts))
            else:
                prefix_BPD, _, _ = self.map_prefix(clip_emb_BC)
                start_BSD = self.start_embeddings(prefix_BPD)
            device = start_BSD.device
            prompt_ids_BT, prompt_mask_BT = prompt_ids_BT.to(device), prompt_mask_BT.to(device)
            common = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                          pad_token_id=self.tokenizer.pad_token_id)
            if self.bottleneck_only and clip_emb_BC is not None:
                if num_beams != 1:
                    raise UserError("bottleneck mode (model.bottleneck_only) decodes greedily: use num_beams=1")
                generated = self._generate_through_bottleneck(start_BSD, common, prompt_ids_BT, prompt_mask_BT)
            else:
                # The left padding of the prompts sits between the start embeddings and the prompt:
                # masked out, and `generate` derives the positions from the mask, so each row's
                # tokens have the positions they had in training.
                embeds = torch.cat([start_BSD, self.lm.get_input_embeddings()(prompt_ids_BT)], dim=1)
                mask = torch.cat([prompt_mask_BT.new_ones(start_BSD.shape[:2]), prompt_mask_BT], dim=1)
                generated = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=num_beams, **common)
        finally:
            self.train(was_training)
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_captions(self, clip_emb_BC: torch.Tensor, max_new_tokens: int, num_beams: int = 1) -> list[str]:
        """Greedy (num_beams=1) or beam-search captions through Hugging Face `generate` with `inputs_embeds`.

        In bottleneck mode the prefix and bottleneck tokens are run once (causal: the bottleneck
        tokens read the prefix, as in training), and `generate` continues from that cache with the
        prefix positions masked out, so caption tokens see the prefix only through the bottleneck
        tokens, as the 4-D training mask has it. The first caption token comes from that forward's
        last logits (greedy), so bottleneck mode decodes greedily."""
        was_training = self.training
        self.eval()
        try:
            prefix_BPD, _, _ = self.map_prefix(clip_emb_BC)
            start_BSD = self.start_embeddings(prefix_BPD)
            batch, start_len = start_BSD.shape[:2]
            ones_BS = torch.ones((batch, start_len), dtype=torch.long, device=start_BSD.device)
            common = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                          pad_token_id=self.tokenizer.pad_token_id)
            if not self.bottleneck_only:
                generated = self.lm.generate(inputs_embeds=start_BSD, attention_mask=ones_BS, num_beams=num_beams, **common)
            else:
                if num_beams != 1:
                    raise UserError("bottleneck mode (model.bottleneck_only) decodes greedily: use num_beams=1")
                generated = self._generate_through_bottleneck(start_BSD, common)
        finally:
            self.train(was_training)
        # With only inputs_embeds, decoder-only `generate` returns just the new tokens.
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def _generate_through_bottleneck(self, start_BSD: torch.Tensor, common: dict, prompt_ids_BT: torch.Tensor | None = None,
                                     prompt_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """New token ids (B, <= max_new_tokens) for bottleneck mode (see `generate_captions`), after
        the start embeddings and, for questions, a left-padded prompt (B, T) read under the training
        mask (`bottleneck_attention_allowed`: the prompt sees the prefix only through the bottleneck)."""
        batch, start_len = start_BSD.shape[:2]
        device = start_BSD.device
        if prompt_ids_BT is None:
            prompt_ids_BT = torch.zeros((batch, 0), dtype=torch.long, device=device)
            prompt_mask_BT = prompt_ids_BT.clone()
        ones_BS = torch.ones((batch, start_len), dtype=torch.long, device=device)
        read_mask_BR = torch.cat([ones_BS, prompt_mask_BT], dim=1)  # R = S + T positions read before decoding
        read_len = read_mask_BR.shape[1]
        # Positions count the real tokens only, as in training, where the prompt follows the start directly.
        positions_BR = (read_mask_BR.cumsum(dim=1) - 1).clamp(min=0)
        cache_argument = lm_cache_argument(self.lm)
        embeds = torch.cat([start_BSD, self.lm.get_input_embeddings()(prompt_ids_BT)], dim=1)
        if prompt_ids_BT.shape[1]:
            allowed = bottleneck_attention_allowed(self.prefix_length, start_len - self.prefix_length, prompt_mask_BT)
            first = self.lm(inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
                            position_ids=positions_BR, use_cache=True)
        else:
            first = self.lm(inputs_embeds=embeds, attention_mask=ones_BS, use_cache=True)
        first_token_B1 = first.logits[:, -1].argmax(dim=-1, keepdim=True)
        if common["max_new_tokens"] == 1:
            return first_token_B1
        ended_B = first_token_B1[:, 0] == common["eos_token_id"]
        # `generate` reads the cached length off the cache and feeds only the ids after it; the ids
        # standing for cached positions are placeholders that are never embedded.
        placeholder_BR = torch.full((batch, read_len), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        visible_BR = read_mask_BR.clone()
        visible_BR[:, : self.prefix_length] = 0
        # Positions count every token as in training: from the masked prefix `generate` would derive them shifted by P.
        positions_BR1 = torch.cat([positions_BR, positions_BR[:, -1:] + 1], dim=1)
        generated = self.lm.generate(
            input_ids=torch.cat([placeholder_BR, first_token_B1], dim=1),
            attention_mask=torch.cat([visible_BR, torch.ones_like(first_token_B1)], dim=1),
            position_ids=positions_BR1,
            **{cache_argument: getattr(first, cache_argument)},
            **{**common, "max_new_tokens": common["max_new_tokens"] - 1},
        )
        new_BT = generated[:, read_len:]
        # `generate` does not know its first token was already EOS for these rows: what follows is not the caption.
        new_BT[ended_B, 1:] = common["pad_token_id"]
        return new_BT

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


def load_language_model_and_tokenizer(model_cfg: ModelConfig, revision: str | None = None,
                                      tokenizer_revision: str | None = None) -> tuple[nn.Module, object]:
    """The configured LM and its (checked) tokenizer, at the given hub revisions (an export's pinned
    ones), refusing a tokenizer larger than the LM's vocabulary."""
    tokenizer = load_tokenizer(model_cfg.tokenizer_name or model_cfg.lm_name, tokenizer_revision)
    lm = load_language_model(model_cfg.lm_name, revision)
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
    align: AlignConfig | None = None,
) -> PrefixCaptioner:
    """LM + tokenizer by name/folder, the configured mapper (its experts spread over `ep_size` ranks),
    optionally loaded from a consolidated state dict (any ep_size; `ep_rank` picks this rank's experts)."""
    lm, tokenizer = load_language_model_and_tokenizer(model_cfg)
    mapper = build_mapper(model_cfg, clip_dim, lm.get_input_embeddings().embedding_dim, ep_size)
    captioner = PrefixCaptioner(mapper, lm, tokenizer, model_cfg, ep_size, align, clip_dim)
    if consolidated_state is not None:
        captioner.load_consolidated_state(consolidated_state, ep_rank)
    return captioner


def load_exported_captioner(export_dir: str | Path) -> PrefixCaptioner:
    """The inference captioner of a complete export (`launcher.export`), in one call: the folded
    mapper, the LM and tokenizer as trained (the bundled `lm/` when saved, else the frozen LM the
    manifest names, at the hub revisions it recorded), the bottleneck tokens and alignment heads.
    A partial export is refused."""
    from safetensors.torch import load_file

    from vlpdist.models.export_manifest import read_export_manifest
    from vlpdist.models.fold import load_folded_mapper

    export_dir = Path(export_dir)
    manifest = read_export_manifest(export_dir)
    model_cfg, align = ModelConfig(**manifest["model"]), AlignConfig(**manifest["align"])
    lm_entry = manifest["lm"]
    revisions = {}
    if lm_entry["source"] == "bundled":
        lm_cfg = dataclasses.replace(model_cfg, lm_name=str(export_dir / lm_entry["path"]), tokenizer_name="")
    else:
        lm_cfg = dataclasses.replace(model_cfg, lm_name=lm_entry["name"], tokenizer_name=lm_entry["tokenizer"])
        # The hub commits the model was trained against: the hub's `main` may have moved on since.
        revisions = {"revision": lm_entry.get("revision"), "tokenizer_revision": lm_entry.get("tokenizer_revision")}
    lm, tokenizer = load_language_model_and_tokenizer(lm_cfg, **revisions)
    captioner = PrefixCaptioner(load_folded_mapper(export_dir), lm, tokenizer, model_cfg, align=align, clip_dim=manifest["clip_dim"])
    extras = load_file(str(export_dir / manifest["extras"])) if manifest["extras"] else {}
    # The bottleneck and heads were created randomly above; every one of them must come from the export.
    wanted = {key for key in captioner.state_dict() if key == "bottleneck" or key.startswith("heads.")}
    if set(extras) != wanted:
        raise UserError(f"export {export_dir}: extras hold {sorted(extras)[:3]}, the model config needs {sorted(wanted)[:3]}")
    captioner.load_state_dict(extras, strict=False)
    return captioner.eval()
