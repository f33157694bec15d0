import pytest
import torch

from bayeslora import ConfigError, DataError
from bayeslora.backbone import load_backbone, lora_parameter_count
from bayeslora.config import LoraSettings
from bayeslora.data import EncodedSplit, Example, answer_token_ids, make_loader
from bayeslora.predictive import MASKED_LOGIT

from .conftest import tiny_model_settings, toy_examples


def _full_lm_reference(backbone, split):
    """Independent reference: the full LM forward on each unpadded prompt, last position, answer rows."""
    rows = []
    with torch.no_grad():
        for item in split.items:
            ids = torch.tensor([item.input_ids])
            logits = backbone.lm(input_ids=ids).logits[0, -1]
            rows.append(logits[split.answer_ids])
    return torch.stack(rows)


def test_answer_head_equals_full_lm_logits_with_left_padding(tiny_backbone_any):
    bb = tiny_backbone_any
    split = EncodedSplit(toy_examples(6), bb.tokenizer, 64, "t")
    assert len({len(e.input_ids) for e in split.items}) > 1, "the batch must contain padding"
    batch = next(iter(make_loader(split, 6)))
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        ours = bb.class_logits(batch)
    assert torch.allclose(ours, _full_lm_reference(bb, split), atol=1e-4)


def test_answer_head_with_lora_matches_full_forward(tiny_backbone):
    tiny_backbone.add_lora("x", LoraSettings(r=2, alpha=4, dropout=0.0), seed=0)
    with torch.no_grad():
        for p in tiny_backbone.lora_parameters("x").values():
            p.normal_(0, 0.5)
    split = EncodedSplit(toy_examples(4), tiny_backbone.tokenizer, 64, "t")
    with torch.no_grad():
        ours = tiny_backbone.class_logits(next(iter(make_loader(split, 4))))
        with tiny_backbone.adapters_disabled():
            base = tiny_backbone.class_logits(next(iter(make_loader(split, 4))))
    assert torch.allclose(ours, _full_lm_reference(tiny_backbone, split), atol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-4)


HEAD_LORA = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "lm_head"])


def test_lm_head_lora_adds_b_k_a_h_over_the_answer_rows_only(tiny_backbone):
    bb = tiny_backbone
    with pytest.raises(ConfigError, match="number of answers K"):
        bb.add_lora("h", HEAD_LORA, seed=0)
    with pytest.raises(ConfigError, match="at least one layer module"):
        bb.add_lora("h", LoraSettings(target_modules=["lm_head"]), num_classes=2)
    bb.add_lora("h", HEAD_LORA, seed=0, num_classes=2)
    params = bb.lora_parameters("h")
    assert params["answer_head_lora.lora_A.weight"].shape == (2, bb.hidden_size)  # r x H
    assert params["answer_head_lora.lora_B.weight"].shape == (2, 2)  # K x r: not the vocabulary
    assert lora_parameter_count(bb, HEAD_LORA, num_classes=2) == sum(p.numel() for p in params.values())
    split = EncodedSplit(toy_examples(4), bb.tokenizer, 64, "t")
    batch = next(iter(make_loader(split, 4)))
    with torch.no_grad():
        untouched = bb.class_logits(batch)  # B = 0: the pretrained head
        torch.testing.assert_close(untouched, _full_lm_reference(bb, split), atol=1e-4, rtol=0)
        a, b = params["answer_head_lora.lora_A.weight"], params["answer_head_lora.lora_B.weight"]
        b.normal_(0, 0.5)
        h = bb.features(batch)  # q_proj's B is still 0: the base model's features
        expected = untouched + (4 / 2) * (h @ a.T) @ b.T
        torch.testing.assert_close(bb.class_logits(batch), expected, atol=1e-5, rtol=0)
        with bb.adapters_disabled():
            torch.testing.assert_close(bb.class_logits(batch), untouched, atol=1e-5, rtol=0)
        state = bb.adapter_state("h")
        doubled = {**state, "answer_head_lora.lora_B.weight": 2 * state["answer_head_lora.lora_B.weight"]}
        with_doubled = bb.class_logits_with("h", doubled, batch)  # functional_call reaches the head too
        torch.testing.assert_close(with_doubled, untouched + 2 * (expected - untouched), atol=1e-5, rtol=0)
    bb.delete_adapter("h")
    assert "answer_head_lora.lora_A.weight" not in bb.lora_parameters("h")
    bb.restore_adapter("h", HEAD_LORA, state)  # K read from the state
    with torch.no_grad():
        torch.testing.assert_close(bb.class_logits(batch), expected, atol=1e-5, rtol=0)
    three = EncodedSplit([Example(f"x{i}", "Q: ", "", "pick. Answer:", (" A", " B", " C"), i % 3) for i in range(3)],
                         bb.tokenizer, 64, "t3")
    with pytest.raises(ConfigError, match="over 2 answer rows; this set has 3"):
        bb.class_logits(next(iter(make_loader(three, 4))))


def test_lm_head_lora_rows_follow_the_answer_tokens_on_other_sets(tiny_backbone):
    bb = tiny_backbone
    two = EncodedSplit(toy_examples(4), bb.tokenizer, 64, "t")  # answers " A", " B"
    bb.add_lora("h", HEAD_LORA, seed=0, answer_ids=two.answer_ids)
    with torch.no_grad():
        bb.lora_parameters("h")["answer_head_lora.lora_B.weight"].normal_(0, 0.5)
    other = EncodedSplit([Example(f"x{i}", "Q: ", "", "pick. Answer:", (" B", " C", " A"), i % 3) for i in range(3)],
                         bb.tokenizer, 64, "t3")
    batch = next(iter(make_loader(other, 3)))
    with torch.no_grad():
        h = bb.features(batch)
        rows = bb.answer_lora.update(h, two.answer_ids)  # (3, 2): rows of " A", " B"
        update = bb.answer_lora.update(h, batch["answer_ids"])
    torch.testing.assert_close(update[:, 0], rows[:, 1])  # " B"
    torch.testing.assert_close(update[:, 2], rows[:, 0])  # " A"
    assert torch.equal(update[:, 1], torch.zeros(3))  # " C" was never trained: no update, as B = 0 there


def test_map_trains_the_lm_head_lora_and_hooked_methods_refuse_it(tiny_backbone, toy_splits):
    from baselines.swag_lora import BLoraXs
    from bayeslora.adapters import fit_lora_adapter
    from bayeslora.config import TrainSettings

    fit = fit_lora_adapter(tiny_backbone, "m", HEAD_LORA, TrainSettings(epochs=1, lr=1e-2, batch_size=8,
                                                                       progress=False), toy_splits[0], None, 0)
    b = tiny_backbone.lora_parameters("m")["answer_head_lora.lora_B.weight"]
    assert fit.trainable_params == lora_parameter_count(tiny_backbone, HEAD_LORA, 2) and b.abs().sum() > 0
    with pytest.raises(ConfigError, match="cannot adapt lm_head"):
        BLoraXs.make_config({"lora": {"target_modules": ["q_proj", "lm_head"]}})


def test_lora_only_on_top_layers(tiny_backbone):
    tiny_backbone.add_lora("top", LoraSettings(layers={"top": 1}))
    names = list(tiny_backbone.lora_parameters("top"))
    assert names and all(".layers.1." in n for n in names)


def test_multi_token_answer_label_is_a_clear_error(tiny_backbone):
    with pytest.raises(DataError, match="one token per label"):
        answer_token_ids(tiny_backbone.tokenizer, (" antidisestablishmentarianism", " B"))


def test_truncation_cuts_passage_from_left_and_keeps_cue(tiny_backbone):
    tok = tiny_backbone.tokenizer
    passage = " ".join(f"word{i}" for i in range(200)) + " THE-END"
    ex = Example("long", "Head: ", passage, "\nQuestion: ok?\nAnswer (true or false):", (" false", " true"), 1)
    split = EncodedSplit([ex], tok, 48, "t")
    ids = split.items[0].input_ids
    text = tok.decode(ids)
    assert len(ids) == 48
    assert text.startswith("Head:") and text.endswith("Answer (true or false):") and "THE-END" in text
    assert "word0 " not in text
    with pytest.raises(DataError, match="raise model.max_length"):
        EncodedSplit([ex], tok, 8, "t")


def test_missing_choices_are_masked(tiny_backbone):
    ex3 = Example("a", "", "", "Q? Answer:", (" A", " B", " C"), 0)
    ex2 = Example("b", "", "", "Q? Answer:", (" A", " B"), 1)
    split = EncodedSplit([ex3, ex2], tiny_backbone.tokenizer, 32, "t")
    with torch.no_grad():
        logits = tiny_backbone.class_logits(next(iter(make_loader(split, 2))))
    assert logits.shape == (2, 3) and logits[1, 2] == MASKED_LOGIT and logits[0, 2] != MASKED_LOGIT


def test_label_out_of_range_is_a_clear_error(tiny_backbone):
    with pytest.raises(DataError, match="out of range"):
        EncodedSplit([Example("z", "", "", "Answer:", (" A", " B"), 2)], tiny_backbone.tokenizer, 32, "t")


def test_local_directory_model_loads(tmp_path, tiny_backbone):
    tiny_backbone.lm.save_pretrained(tmp_path)
    tiny_backbone.tokenizer.save_pretrained(tmp_path)
    again = load_backbone({"name": str(tmp_path)})
    split = EncodedSplit(toy_examples(3), again.tokenizer, 64, "t")
    batch = next(iter(make_loader(split, 3)))
    with torch.no_grad():
        assert torch.allclose(again.class_logits(batch), tiny_backbone.class_logits(batch), atol=1e-5)
    assert tiny_model_settings()["random_init"]["arch"] == "llama"
