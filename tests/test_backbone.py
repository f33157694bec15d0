import pytest
import torch

from bayeslora import DataError
from bayeslora.backbone import load_backbone
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
