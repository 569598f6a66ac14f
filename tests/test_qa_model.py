"""Questions through the prefix LM (issue 18 item 2): `[prefix | bottleneck | prompt | answer]`,
a loss on the answer tokens only, and `generate_answers` (greedy, beam, bottleneck, LM alone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlpdist.config import ModelConfig
from vlpdist.models.captioner import IGNORE_INDEX, build_captioner, tokenize_lm_inputs

CLIP_DIM = 16
TEMPLATE = "Question: {question} Answer:"


def _cfg(lm_dir, **kwargs) -> ModelConfig:
    return ModelConfig(lm_name=str(lm_dir), mapper="mlp", prefix_length=3, max_caption_tokens=48, max_answer_tokens=4,
                       question_template=TEMPLATE, **kwargs)


def _mixed_inputs(captioner):
    return tokenize_lm_inputs(
        captioner.tokenizer, 48, 4, TEMPLATE,
        ["a red circle", "", "a blue square on the left"],
        [None, "what colour is the circle?", "is there a square?"],
        [None, "red", "yes"],
    )


def test_lm_inputs_mark_only_answer_tokens_as_targets(tiny_lm):
    captioner = build_captioner(_cfg(tiny_lm), CLIP_DIM)
    tokenizer = captioner.tokenizer
    ids_BT, mask_BT, target_BT = _mixed_inputs(captioner)
    assert (target_BT[0] == mask_BT[0]).all()  # a caption: every token a target
    prompt = tokenizer("Question: what colour is the circle? Answer:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" red", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = ids_BT[1][mask_BT[1].bool()].tolist()
    assert row == prompt + answer
    assert ids_BT[1][target_BT[1].bool()].tolist() == answer
    assert target_BT[1, : len(prompt)].sum() == 0


def test_answer_loss_is_hand_ce_over_answer_positions_and_ignores_prompt_targets(tiny_lm):
    torch.manual_seed(0)
    captioner = build_captioner(_cfg(tiny_lm), CLIP_DIM).eval()
    clip_BC = torch.randn(3, CLIP_DIM)
    ids_BT, mask_BT, target_BT = _mixed_inputs(captioner)
    is_question_B = torch.tensor([False, True, True])
    out = captioner(clip_BC, ids_BT, mask_BT, target_mask_BT=target_BT, is_question_B=is_question_B)
    # By hand: the full LM forward over [prefix | tokens], position t predicting token t+1.
    prefix_BPD, _, _ = captioner.map_prefix(clip_BC)
    embeds = torch.cat([prefix_BPD, captioner.lm.get_input_embeddings()(ids_BT)], dim=1)
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), mask_BT], dim=1)
    logits_BTV = captioner.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, 2:-1]
    answer_targets = ids_BT.masked_fill((target_BT == 0) | ~is_question_B[:, None], IGNORE_INDEX)
    caption_targets = ids_BT.masked_fill((target_BT == 0) | is_question_B[:, None], IGNORE_INDEX)
    hand_ans = F.cross_entropy(logits_BTV.flatten(0, 1), answer_targets.flatten(), ignore_index=IGNORE_INDEX)
    hand_cap = F.cross_entropy(logits_BTV.flatten(0, 1), caption_targets.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(out["ans"], hand_ans, atol=1e-5) and torch.allclose(out["cap"], hand_cap, atol=1e-5)
    # The prompt tokens' "targets" (what they are) cannot move the loss: other prompt words, same answer.
    other = tokenize_lm_inputs(captioner.tokenizer, 48, 4, TEMPLATE, ["a red circle", "", "a blue square on the left"],
                               [None, "what colour is the star?", "is there a star?"], [None, "red", "yes"])
    changed = ids_BT.clone()
    prompt_BT = (mask_BT == 1) & (target_BT == 0)
    changed[prompt_BT] = (changed[prompt_BT] + 1) % len(captioner.tokenizer)  # the prompts' own ids, shifted
    # Same inputs except the targets at prompt positions: the gradient-free loss depends on targets only through target_mask.
    assert not torch.equal(other[0], ids_BT)
    logits_again = captioner.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, 2:-1]
    targets_changed = changed.masked_fill((target_BT == 0) | ~is_question_B[:, None], IGNORE_INDEX)
    assert torch.equal(targets_changed, answer_targets)
    assert torch.allclose(F.cross_entropy(logits_again.flatten(0, 1), targets_changed.flatten(), ignore_index=IGNORE_INDEX), out["ans"], atol=1e-5)


def test_answer_loss_needs_no_questions(tiny_lm):
    captioner = build_captioner(_cfg(tiny_lm), CLIP_DIM)
    ids_BT, mask_BT = captioner.tokenize(["a red circle", "a star"])
    out = captioner(torch.randn(2, CLIP_DIM), ids_BT, mask_BT)
    assert out["ans"].item() == 0.0 and torch.isfinite(out["cap"])


@pytest.mark.parametrize("bottleneck", [0, 2])
def test_generate_answers_matches_one_question_at_a_time_and_the_training_argmax(tiny_lm, bottleneck):
    torch.manual_seed(1)
    captioner = build_captioner(_cfg(tiny_lm, bottleneck_tokens=bottleneck), CLIP_DIM).eval()
    clip_BC = torch.randn(2, CLIP_DIM)
    questions = ["what colour is the circle?", "how many shapes are there in this picture?"]
    together = captioner.generate_answers(clip_BC, questions, max_new_tokens=3)
    alone = [captioner.generate_answers(clip_BC[i : i + 1], [q], max_new_tokens=3)[0] for i, q in enumerate(questions)]
    assert together == alone  # the left padding of the shorter prompt changes nothing
    # The first answer token is the argmax of the training forward at the prompt's last position.
    tokenizer = captioner.tokenizer
    ids_BT, mask_BT, target_BT = tokenize_lm_inputs(tokenizer, 48, 4, TEMPLATE, ["", ""], questions, ["x", "x"])
    start = captioner.start_embeddings(captioner.map_prefix(clip_BC)[0])
    embeds = torch.cat([start, captioner.lm.get_input_embeddings()(ids_BT)], dim=1)
    if bottleneck:
        from vlpdist.models.captioner import additive_mask, bottleneck_attention_allowed

        mask = additive_mask(bottleneck_attention_allowed(3, bottleneck, mask_BT), embeds.dtype)
    else:
        mask = torch.cat([torch.ones(2, start.shape[1], dtype=torch.long), mask_BT], dim=1)
    logits = captioner.lm(inputs_embeds=embeds, attention_mask=mask).logits
    for row, question in enumerate(questions):
        last_prompt = start.shape[1] + int(target_BT[row].nonzero()[0]) - 1
        first_word = tokenizer.decode([int(logits[row, last_prompt].argmax())], skip_special_tokens=True).strip()
        assert together[row].startswith(first_word) or first_word == ""


def test_generate_answers_beam_and_without_image(tiny_lm):
    captioner = build_captioner(_cfg(tiny_lm), CLIP_DIM).eval()
    beamed = captioner.generate_answers(torch.randn(2, CLIP_DIM), ["is it red?", "what is left of the star?"], 3, num_beams=2)
    blind = captioner.generate_answers(None, ["is it red?", "what is left of the star?"], 3)
    assert len(beamed) == len(blind) == 2 and all(isinstance(answer, str) for answer in beamed + blind)
    bottleneck = build_captioner(_cfg(tiny_lm, bottleneck_tokens=2), CLIP_DIM).eval()
    from vlpdist.errors import UserError

    with pytest.raises(UserError, match="greedily"):
        bottleneck.generate_answers(torch.randn(1, CLIP_DIM), ["is it red?"], 3, num_beams=2)
