"""Paraphrase augmentation (issue 18 item 6): k paraphrases of every kept caption and every question.

The processing stage writes them into each feature sample beside the originals, marked as such
(`caption_paraphrases`, `question_paraphrases` in `vlpdist.data.feature_format`); training may
read one in place of the original (`train.paraphrase_prob`), evaluation never does.

Two backends, chosen by `process.paraphraser`:

- a Hugging Face seq2seq paraphrase model by name or local folder (e.g. `tuner007/pegasus_paraphrase`),
  loaded with `AutoTokenizer` / `AutoModelForSeq2SeqLM` like BLIP is in `capfilt`, run with beam
  search: the `process.paraphrase_beams` best beams of each text, of which the first k distinct
  ones that differ from the text are kept. Beam search, not sampling: the same text gets the same
  paraphrases in every run, so a re-processed shard is the same shard;
- `synthetic`: the demo world's own alternative phrasings (`data_ingest.sources.synthetic`). The
  stage sees the text only, not the scene it came from, so this backend parses the text with the
  demo grammar and rephrases what it parsed; a text the grammar did not make gets no paraphrases.

Both run where BLIP runs: in the `ShardProcessor` of each device (`shard.load_models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlpdist.errors import UserError

SYNTHETIC_BACKEND = "synthetic"
"""`process.paraphraser` value that selects the demo world's own phrasings."""


@dataclass
class Paraphraser:
    """A loaded paraphrase backend: the synthetic grammar (no model), or a seq2seq model and its tokenizer."""

    name: str
    model: object | None = None  # an AutoModelForSeq2SeqLM on the task's device
    tokenizer: object | None = None


def paraphrase_signature(settings) -> dict | None:
    """What of `process` decides a shard's paraphrases (None when paraphrasing is off). Each shard's
    stats record it, and a shard whose record differs from the run's is processed again."""
    if not settings.paraphraser:
        return None
    signature = {"paraphraser": settings.paraphraser, "num_paraphrases": settings.num_paraphrases}
    if settings.paraphraser != SYNTHETIC_BACKEND:  # the grammar has no beams nor token limit
        signature.update(beams=settings.paraphrase_beams, max_tokens=settings.paraphrase_max_tokens)
    return signature


def check_paraphraser_settings(settings) -> None:
    """One-line errors for settings no backend can run, and for a model folder that does not exist."""
    if not settings.paraphraser:
        return
    if settings.num_paraphrases < 1:
        raise UserError("config key 'process.num_paraphrases' must be >= 1")
    if settings.paraphraser != SYNTHETIC_BACKEND:
        if settings.paraphrase_beams < settings.num_paraphrases:
            raise UserError(f"config key 'process.paraphrase_beams' is {settings.paraphrase_beams}; beam search "
                            f"returns at most that many paraphrases, so it must be >= process.num_paraphrases "
                            f"({settings.num_paraphrases})")
        if settings.paraphrase_max_tokens < 1:
            raise UserError("config key 'process.paraphrase_max_tokens' must be >= 1")
        name = settings.paraphraser
        if name.startswith((".", "/")) and not Path(name).is_dir():
            raise UserError(f"config key 'process.paraphraser': cannot load paraphrase model {name!r}: no such folder")


def load_paraphraser(name_or_path: str, device: str = "cpu") -> Paraphraser:
    """The backend `process.paraphraser` names: `synthetic`, or a seq2seq model from a HF name or local folder."""
    if name_or_path == SYNTHETIC_BACKEND:
        return Paraphraser(SYNTHETIC_BACKEND)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # not on the hub / not a model folder / not a seq2seq model
        raise UserError(f"cannot load paraphrase model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    return Paraphraser(name_or_path, model.to(device).eval(), tokenizer)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def distinct_paraphrases(text: str, candidates: list[str], count: int) -> list[str]:
    """The first `count` candidates, stripped, that are neither empty, nor the text itself, nor an
    earlier candidate (compared lower-cased, whitespace collapsed)."""
    seen, kept = {_normalised(text)}, []
    for candidate in candidates:
        candidate = candidate.strip()
        if candidate and _normalised(candidate) not in seen:
            seen.add(_normalised(candidate))
            kept.append(candidate)
            if len(kept) == count:
                break
    return kept


def generate_paraphrases(model, tokenizer, texts: list[str], count: int, beams: int, max_tokens: int,
                         device: str, batch_size: int = 32) -> list[list[str]]:
    """Up to `count` paraphrases of each text: its `beams` beam-search hypotheses, best first, of
    which the first `count` distinct ones that differ from the text (`distinct_paraphrases`).
    Every beam is returned (it costs nothing more than the search), so a beam that repeats the
    input or another beam does not leave the text short of paraphrases."""
    import torch

    from data_ingest.process.clip_model import inference_autocast

    paraphrases: list[list[str]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        tokens = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
        with torch.no_grad(), inference_autocast(device):
            token_ids = model.generate(
                input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
                num_beams=beams,
                num_return_sequences=beams,
                do_sample=False,
                max_new_tokens=max_tokens,
            )  # (b * beams, T), the beams of a text adjacent, best first
        decoded = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        paraphrases += [distinct_paraphrases(text, decoded[i * beams : (i + 1) * beams], count)
                        for i, text in enumerate(chunk)]
    return paraphrases


def paraphrase_texts(paraphraser: Paraphraser, texts: list[str], settings, device: str) -> list[list[str]]:
    """Up to `process.num_paraphrases` paraphrases of each text (each distinct text paraphrased once)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    count = settings.num_paraphrases
    if paraphraser.model is None:
        from data_ingest.sources.synthetic import alternative_phrasings

        found = [distinct_paraphrases(text, alternative_phrasings(text, count), count) for text in unique]
    else:
        found = generate_paraphrases(paraphraser.model, paraphraser.tokenizer, unique, count, settings.paraphrase_beams,
                                     settings.paraphrase_max_tokens, device, settings.batch_size)
    by_text = dict(zip(unique, found))
    return [list(by_text[text]) for text in texts]
