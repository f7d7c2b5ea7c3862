"""Bad input, table-driven: every loader and every schema, the pipeline's own files included, gives a DataError that
names the file, the line and the field, or is skipped and counted; never a raw TypeError, never a silent change.

Rows: (file kind, what is wrong, a change to one good row, the message expected after "path:LINE: ").
"""

import json

import pytest

from minirlaif import data, reward, utils
from minirlaif.data import DataError
from minirlaif.models import train_bpe_tokenizer

GOOD = {
    "pairs": {"id": "p1", "subreddit": "tifu", "title": "t", "post": "my post", "summary_a": "a", "summary_b": "b",
              "p_a_ab": 0.6, "p_a_ba": 0.8, "p_a": 0.7, "null_reason": None, "tokens_a": [5, 6], "tokens_b": [7]},
    "candidates": {"id": "p1", "subreddit": "tifu", "title": "t", "post": "my post", "query": "q", "query_truncated":
                   False, "summary_a": "a", "summary_b": "b", "tokens_a": [5, 6], "tokens_b": [7]},
    "generations": {"id": "p1", "text": "a summary", "token_ids": [5, 6, 2]},
    "judgments": {"id": "p1", "sha": "abc", "p_a": 0.5, "p_a_ab": 0.4, "p_a_ba": 0.6, "identical": False,
                  "null_reason": None},
    "tldr": {"id": "p1", "subreddit": "tifu", "title": "t", "post": "my post", "summary": "a summary"},
    "comparisons": {"info": {"id": "p1", "post": "my post", "title": "t", "subreddit": "tifu"},
                    "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0, "extra": {"confidence": 8}},
}
# the pipeline's own files and the function that reads each back
OWN = {"pairs": None, "candidates": utils.CANDIDATE_SCHEMA, "generations": utils.GENERATION_SCHEMA,
       "judgments": utils.JUDGMENT_SCHEMA}

CASES = [
    ("pairs", "post is a number", {"post": 5}, "field 'post' must be str"),
    ("pairs", "summary is a list", {"summary_b": ["b"]}, "field 'summary_b' must be str"),
    ("pairs", "p_a is a string", {"p_a": "0.7"}, "field 'p_a' must be a probability or null"),
    ("pairs", "p_a out of [0, 1]", {"p_a": 1.5}, "field 'p_a' must be a probability or null"),
    ("pairs", "p_a is NaN", {"p_a": float("nan")}, "field 'p_a' must be a probability or null"),
    ("pairs", "p_a_ab is a bool", {"p_a_ab": True}, "field 'p_a_ab' must be a probability or null"),
    ("pairs", "float token id", {"tokens_a": [5, 6.7]}, "field 'tokens_a' must be a list of token ids"),
    ("pairs", "bool token id", {"tokens_b": [True]}, "field 'tokens_b' must be a list of token ids"),
    ("pairs", "negative token id", {"tokens_b": [-1]}, "field 'tokens_b' must be a list of token ids"),
    ("pairs", "token ids as a string", {"tokens_a": "5 6"}, "field 'tokens_a' must be a list of token ids"),
    ("pairs", "token id past the vocabulary", {"tokens_a": [10 ** 6]}, "field 'tokens_a' must be token ids of the"),
    ("pairs", "missing p_a", {"p_a": KeyError}, "missing required field 'p_a'"),
    ("pairs", "id twice", "dup", "id 'p1' already on"),
    ("pairs", "malformed JSON", "garbage", "malformed JSON line"),
    ("candidates", "query_truncated is a string", {"query_truncated": "no"}, "field 'query_truncated' must be bool"),
    ("candidates", "float token id", {"tokens_b": [7.0]}, "field 'tokens_b' must be a list of token ids"),
    ("candidates", "title is a dict", {"title": {}}, "field 'title' must be str or null"),
    ("candidates", "missing summary", {"summary_a": KeyError}, "missing required field 'summary_a'"),
    ("candidates", "not an object", "list", "expected a JSON object per line"),
    ("candidates", "malformed JSON", "garbage", "malformed JSON line"),
    ("generations", "text is null", {"text": None}, "field 'text' must be str"),
    ("generations", "float token id", {"token_ids": [1.5]}, "field 'token_ids' must be a list of token ids"),
    ("judgments", "identical is 0", {"identical": 0}, "field 'identical' must be bool"),
    ("judgments", "p_a is infinite", {"p_a": float("inf")}, "field 'p_a' must be a probability or null"),
    ("tldr", "post is a number", {"post": 5}, "field 'post' must be str"),
    ("tldr", "missing summary", {"summary": KeyError}, "missing required field 'summary'"),
    ("comparisons", "choice 2", {"choice": 2}, "field 'choice' must be 0 or 1"),
    ("comparisons", "confidence 12", {"extra": {"confidence": 12}}, "field 'extra.confidence' must be in 1..9"),
]


@pytest.fixture(scope="module")
def enc():
    tok = train_bpe_tokenizer(["my post a b summary tifu t q"] * 10, vocab_size=300)
    return reward.Encoder(tok, max_query_tokens=64, max_summary_tokens=16)


def bad_file(path, kind, change) -> int:
    """A file of a good row and then the bad one; returns the bad row's line number (2)."""
    good = dict(GOOD[kind])
    if kind in ("tldr", "comparisons"):  # a second, different post, so that only the change is wrong
        second = json.loads(json.dumps(good).replace("p1", "p2"))
    else:
        second = {**good, "id": "p2"}
    if change == "dup":
        second["id"] = good["id"]
        lines = [json.dumps(good), json.dumps(second)]
    elif change == "garbage":
        lines = [json.dumps(good), '{"id": "p2", "text": ']
    elif change == "list":
        lines = [json.dumps(good), "[1, 2]"]
    else:
        for k, v in change.items():
            if v is KeyError:
                del second[k]
            else:
                second[k] = v
        lines = [json.dumps(good), json.dumps(second)]
    path.write_text("\n".join(lines) + "\n")
    return 2


def read(kind, path, enc):
    if kind == "pairs":
        return reward.load_ai_pairs(path, enc)
    if kind == "tldr":
        return data.load_posts(path)
    if kind == "comparisons":
        return data.load_comparisons(path)
    return utils.read_jsonl_resumable(path, OWN[kind])


@pytest.mark.parametrize("kind,what,change,message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_a_bad_row_names_its_file_line_and_field(kind, what, change, message, enc, tmp_path):
    path = tmp_path / f"{kind}.jsonl"
    line = bad_file(path, kind, change)
    before = path.read_bytes()
    with pytest.raises(DataError) as e:
        read(kind, path, enc)
    assert str(e.value).startswith(f"{path}:{line}: ") and message in str(e.value), str(e.value)
    assert path.read_bytes() == before  # a bad complete row is reported, never cut off
    if kind in OWN and kind != "pairs":  # the read-only reader of an input says the same
        with pytest.raises(DataError, match=f"^{path}:{line}: "):
            utils.read_jsonl(path, OWN[kind])


def test_a_row_cut_by_a_kill_is_the_only_thing_cut(tmp_path):
    """Our own append-only file: a partial last line (no newline) is the row in flight and is cut; an input file
    read with read_jsonl keeps a complete last line without a newline."""
    path = tmp_path / "candidates.jsonl"
    row = json.dumps(GOOD["candidates"])
    path.write_text(row + "\n" + row.replace("p1", "p2")[:30])
    assert [r["id"] for r in utils.read_jsonl_resumable(path, utils.CANDIDATE_SCHEMA)] == ["p1"]
    assert path.read_text() == row + "\n"
    path.write_text(row + "\n" + row.replace("p1", "p2"))  # complete, no newline
    assert [r["id"] for r in utils.read_jsonl(path, utils.CANDIDATE_SCHEMA)] == ["p1", "p2"]
    assert path.read_text().endswith("}")


def test_repeated_ids_in_our_own_files_are_refused(tmp_path):
    path = tmp_path / "candidates.jsonl"
    path.write_text((json.dumps(GOOD["candidates"]) + "\n") * 2)
    with pytest.raises(DataError, match="id 'p1' is written more than once"):
        utils.unique_ids(utils.read_jsonl_resumable(path, utils.CANDIDATE_SCHEMA), path)


def test_empty_rows_are_skipped_and_counted_by_every_post_loader(tmp_path):
    rows = [GOOD["tldr"], {**GOOD["tldr"], "id": "p2", "post": "  "}, {**GOOD["tldr"], "id": "p3", "summary": ""}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    posts, stats = data.load_posts(tmp_path / "sft.jsonl")
    assert [p.id for p in posts] == ["p1"] and stats.n_skipped_empty == 2 and stats.n_read == 3
