"""The demo's small language model, the stand-in for a hub "gpt2" in the world the demo makes for itself.

Built by the demo's LM stage (`launcher/demo.py`), by `python -m launcher.make_demo_lm`, and by tests
and benchmarks that need a real tokenizer and LM without a hub.

No hub here, so the demo makes its own "gpt2": a byte-level BPE tokenizer trained with Hugging Face
`tokenizers` on the demo captions (pad/bos/eos special tokens), a tiny `GPT2Config` LM pretrained
briefly on the caption text (a frozen *random* LM cannot be steered by a prefix; this mirrors GPT-2
being pretrained), both saved with `save_pretrained`. The captioner then loads the folder through
the same `from_pretrained(local_dir)` path it uses for "gpt2".

The folder is marked as this builder's output (`vlpdist.atomic`): a rebuild replaces its own earlier
folder atomically and refuses any other non-empty folder, which it never overwrites.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlpdist.atomic import refuse_foreign_output, replace_output_dir
from vlpdist.errors import UserError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
WRITER = "launcher.make_demo_lm"  # the marker's name for a folder this builder wrote, whoever called it


def train_caption_tokenizer(captions: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2's scheme) trained on `captions`, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def pretrain_on_captions(lm, tokenizer, captions: list[str], steps: int, batch_size: int, seed: int,
                         block_size: int = 64) -> float:
    """Next-token training of `lm` on the captions packed into one stream, GPT-2 style; returns the last loss.

    Packing (`<bos> caption <eos> <bos> caption <eos> ...` cut into random windows) puts captions at
    every position: the captioner later feeds them after P prefix tokens, at positions a model
    trained only on position-0 captions never saw.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(captions), generator=generator).tolist()
    encoded = tokenizer([captions[i] for i in order])["input_ids"]
    stream_N = torch.tensor([t for ids in encoded for t in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)])
    block_size = min(block_size, len(stream_N) - 1, lm.config.n_positions)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    lm.train()
    for _ in range(steps):
        starts_B = torch.randint(len(stream_N) - block_size, (batch_size,), generator=generator)
        windows_BL = torch.stack([stream_N[s : s + block_size] for s in starts_B.tolist()])
        loss = lm(input_ids=windows_BL, labels=windows_BL).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()


def make_demo_lm(
    out_dir: str | os.PathLike,
    captions: list[str],
    *,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    steps: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    option: str = "--out",
) -> Path:
    """Train tokenizer + tiny GPT-2 on `captions` and save both into `out_dir`: new, empty, or this
    builder's earlier output (replaced as a whole, never half-written); any other folder is refused
    before the training. `option` names the setting that chose `out_dir`, for the message."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not captions:
        raise UserError("make_demo_lm needs at least one caption")
    refuse_foreign_output(out_dir, WRITER, option)  # before the training: a refusal costs nothing
    torch.manual_seed(seed)
    tokenizer = train_caption_tokenizer(captions, vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    lm = GPT2LMHeadModel(config)
    pretrain_on_captions(lm, tokenizer, captions, steps, batch_size, seed)
    with replace_output_dir(out_dir, WRITER, option) as staging:
        lm.eval().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(out_dir)
