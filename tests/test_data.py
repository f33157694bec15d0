import gzip
import json

import pytest

from bayeslora import ConfigError, DataError
from bayeslora.config import DataSettings
from bayeslora.data import get_task, load_task_splits
from bayeslora.data.sources import read_requests
from bayeslora.data.tasks import arc_row


def test_mc_prompt_renders_letter_then_text():
    ex = arc_row({"id": "q1", "question": "What is 1+1?", "answerKey": "2",
                  "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}}, 0)
    assert "Choices:\nA) one\nB) two\nC) three\nAnswer:" in ex.prompt
    assert ex.prompt.startswith("Return the label of the correct answer for the question below.\n\nQuestion: What")
    assert ex.answers == (" A", " B", " C") and ex.label == 1


def test_bad_answer_key_is_a_clear_error():
    with pytest.raises(DataError, match="answer key"):
        arc_row({"id": "q", "question": "?", "answerKey": "Z", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, 0)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError, match="Known datasets: .*sst2"):
        get_task("sst3")


def test_requests_parser(tmp_path):
    doc = {"id": "X1", "query": "Question: Why?\nSecond line\n A. first\n B. second\nAnswer:", "choices": ["A", "B"],
           "gold": 1}
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for _ in range(2):  # duplicated doc_id (one request per choice) must be deduplicated
            f.write(json.dumps({"doc": doc, "doc_id": 0}) + "\n")
    rows = read_requests(path)
    assert rows == [{"id": "X1", "question": "Why?\nSecond line", "answerKey": "B",
                     "choices": {"text": ["first", "second"], "label": ["A", "B"]}}]


def test_local_files_in_hub_schema(tmp_path):
    def write(name, n):
        with open(tmp_path / name, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{name}-{i}", "question": f"q{i}?", "answerKey": "B",
                                    "choices": {"text": ["x", "y"], "label": ["A", "B"]}}) + "\n")
    write("train.jsonl", 10)
    write("test.jsonl", 4)
    splits = load_task_splits(get_task("arc_easy"), DataSettings(
        source="files", files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
        val_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert splits.protocol.startswith("files:")
    with pytest.raises(ConfigError, match="data.files"):
        load_task_splits(get_task("arc_easy"), DataSettings(source="files", files={"train": "x"}))
    with pytest.raises(DataError, match="does not exist"):
        load_task_splits(get_task("arc_easy"), DataSettings(source="files", files={"train": "nope.jsonl",
                                                                                  "test": "nope.jsonl"}))


def test_rows_in_wrong_schema_name_the_missing_field(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    with pytest.raises(DataError, match="row 1 lacks field 'sentence'"):
        load_task_splits(get_task("sst2"), DataSettings(source="files", files={
            "train": str(tmp_path / "t.jsonl"), "test": str(tmp_path / "t.jsonl")}))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sst2", "sst2_as_boolq", "news_as_sst2", "boolq", "wg_s", "arc_easy", "arc_challenge",
                                  "obqa"])
def test_offline_splits_are_disjoint_and_deterministic(name):
    settings = DataSettings(max_test=100)
    a, b = load_task_splits(get_task(name), settings), load_task_splits(get_task(name), settings)
    ids = lambda xs: [e.id for e in xs]
    assert ids(a.train) == ids(b.train) and ids(a.test) == ids(b.test)
    assert not set(ids(a.train)) & set(ids(a.test)) and not set(ids(a.val)) & set(ids(a.train))
    assert len(a.test) == 100 and len(a.train) > 0 and a.protocol.startswith("offline:")
    assert all(0 <= e.label < len(e.answers) for e in a.train + a.test)
    other = load_task_splits(get_task(name), DataSettings(max_test=100, split_seed=1))
    assert ids(other.test) != ids(a.test)


@pytest.mark.integration
def test_sst2_as_boolq_poses_the_sst2_test_sentences_in_boolq_form():
    settings = DataSettings(max_test=20)
    shifted = load_task_splits(get_task("sst2_as_boolq"), settings).test
    sst2 = load_task_splits(get_task("sst2"), settings).test
    boolq = load_task_splits(get_task("boolq"), settings).test
    assert [e.passage for e in shifted] == [e.passage for e in sst2]
    assert [e.label for e in shifted] == [e.label for e in sst2]
    assert all(e.answers == boolq[0].answers and e.head == boolq[0].head for e in shifted)
