"""Tests of minirlaif.data: every schema and source, the query format, truncation, and bad input.

Hermetic: every fixture file is written here (tmp_path) in the hub datasets' schemas, and the hub branch runs on a
monkeypatched `datasets.load_dataset` that returns an in-memory Dataset, so no network is needed.
"""

import hashlib
import json
import random
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minirlaif.data import (Comparison, DataError, LoadStats, Post, build_query, comparison_to_row, encode_completion,
                            encode_query, format_completion, format_query, load_comparisons, load_posts,
                            normalize_summary, parse_query, post_to_row, special_prefix, unique_posts, write_jsonl)

# ----------------------------------------------------------------------------------------------------------------
# fixtures in the hub schemas

TLDR_ROWS = [  # vwxyzjn/summarize_from_feedback_tldr_3_filtered (+ facts, as the synthetic task writes)
    {"id": "t3_a", "subreddit": "relationships", "title": "My (25F) boyfriend (27M) lied",
     "post": "We met 2 years ago.\nLast week he lied about money.\n\nShould I leave?", "summary": "bf lied, leave?",
     "facts": {"relation": "boyfriend", "poster_age": 25}},
    {"id": "t3_b", "subreddit": "tifu", "title": "TIFU by cooking", "post": "  I burned the rice.  ",
     "summary": " I burned rice<|endoftext|>", "facts": None},
]
COMPARISON_INFO = [
    {"id": "t3_p1", "post": "Post one.\nSecond line.", "title": "Title one", "subreddit": "AskReddit",
     "site": None, "article": None},
    {"id": "t3_p2", "post": "Post two.", "title": "Title two", "subreddit": "relationships",
     "site": None, "article": None},
]


def comparison_row(info, s0, s1, choice, confidence, split="valid1", worker="w1", batch="batch3"):
    """One row of openai/summarize_from_feedback `comparisons`."""
    return {"info": info, "summaries": [{"text": s0, "policy": "sup2", "note": None},
                                        {"text": s1, "policy": "ref", "note": "short"}],
            "choice": choice, "worker": worker, "batch": batch, "split": split, "extra": {"confidence": confidence}}


CNNDM_INFO = {"id": "cnn-1", "post": None, "title": "Storm hits", "subreddit": None, "site": "dailymail",
              "article": "A storm hit the coast on Monday."}
COMPARISON_ROWS = [
    comparison_row(COMPARISON_INFO[0], " first summary", " second summary", 1, 8),
    comparison_row(CNNDM_INFO, " storm", " a storm hit", 0, 9),
    comparison_row(COMPARISON_INFO[1], " p2 a", " p2 b", 0, None),
    comparison_row(COMPARISON_INFO[0], " third", " fourth", 0, 3, split="valid2"),
]


def write_lines(path, rows, extra_lines=()):
    """Rows as JSON Lines, plus raw lines appended (for blank or malformed lines)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def make_tokenizer(texts, vocab_size=500):
    """A real byte-level BPE (GPT-2 style) trained on texts, wrapped like a hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="[PAD]")


WORDS = ("i my boyfriend girlfriend and we have been together for years months he she said that it was not "
         "okay so reddit should leave stay talk about money friends family work dinner weekend").split()


def random_text(rng, n_words, newline_every=None):
    """Reddit-like text; a newline instead of a space after every `newline_every`-th word."""
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS))
        if i < n_words - 1:
            out.append("\n" if newline_every and (i + 1) % newline_every == 0 else " ")
    return "".join(out)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    corpus = [format_query("relationships", random_text(rng, 6), random_text(rng, 60, 9)) for _ in range(200)]
    return make_tokenizer(corpus)


# ----------------------------------------------------------------------------------------------------------------
# formatting


def test_format_query_and_completion_exact():
    assert format_query("tifu", "My title", "Line 1\nLine 2") == \
        "SUBREDDIT: r/tifu\n\nTITLE: My title\n\nPOST: Line 1\nLine 2\n\nTL;DR:"
    assert format_completion("short summary", "<|endoftext|>") == " short summary<|endoftext|>"


def test_parse_query_inverts_format_query():
    cases = [("tifu", "t", "p"), ("AskReddit", "Title: with colon", "para 1\n\npara 2\n\nTL;DR: inside the post"),
             ("x", "", ""), ("relationships", "Me [25F]", "ends with newline\n")]
    for subreddit, title, post in cases:
        assert parse_query(format_query(subreddit, title, post)) == (subreddit, title, post)
    for bad in ["SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p", "TITLE: t\n\nPOST: p\n\nTL;DR:",
                "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR: summary"]:
        with pytest.raises(DataError, match="not a TL;DR query"):
            parse_query(bad)


def test_normalize_summary_strips_one_space_and_eos():
    assert normalize_summary(" a summary") == "a summary"
    assert normalize_summary("  two spaces") == " two spaces"  # exactly one space
    assert normalize_summary(" s<|endoftext|>") == "s"
    assert normalize_summary("no space</s>") == "no space"
    assert normalize_summary("keep trailing \n") == "keep trailing \n"


# ----------------------------------------------------------------------------------------------------------------
# loading each schema


def expected_tldr_posts(source_of):
    return [
        Post("t3_a", "relationships", "My (25F) boyfriend (27M) lied",
             "We met 2 years ago.\nLast week he lied about money.\n\nShould I leave?", "bf lied, leave?",
             {"relation": "boyfriend", "poster_age": 25}, source_of(0)),
        Post("t3_b", "tifu", "TIFU by cooking", "  I burned the rice.  ", "I burned rice", None, source_of(1)),
    ]


def test_load_tldr_jsonl(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", TLDR_ROWS)
    posts, stats = load_posts(path)
    assert posts == expected_tldr_posts(lambda i: f"{path}:{i + 1}")
    assert (stats.schema, stats.n_read, stats.n_kept, stats.n_skipped_empty) == ("tldr", 2, 2, 0)
    assert stats.to_dict()["source"] == str(path)


def test_load_tldr_parquet(tmp_path):
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "facts": json.dumps(r["facts"])} for r in TLDR_ROWS]), path)
    with pytest.raises(DataError, match=r"sft\.parquet row 0: field 'facts' must be dict"):
        load_posts(path)  # a facts column of strings is the wrong type
    rows = [{k: v for k, v in r.items() if k != "facts"} for r in TLDR_ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    posts, stats = load_posts(path)
    want = expected_tldr_posts(lambda i: f"{path} row {i}")
    want[0].facts = None
    assert posts == want and stats.n_kept == 2


def test_load_prompt_completion(tmp_path):
    prompt = format_query("tifu", "TIFU by cooking", "I burned the rice.\n\nTL;DR: rice")
    rows = [{"prompt": prompt, "completion": "  two spaces kept one"},
            {"prompt": prompt, "completion": " eos stripped<|endoftext|>", "id": "given-id"}]
    posts, stats = load_posts(write_lines(tmp_path / "trl.jsonl", rows))
    assert stats.schema == "prompt_completion" and stats.n_kept == 2
    assert posts[0].id == "prompt-" + hashlib.sha1(prompt.encode()).hexdigest()[:16]
    assert (posts[0].subreddit, posts[0].title, posts[0].post) == ("tifu", "TIFU by cooking",
                                                                    "I burned the rice.\n\nTL;DR: rice")
    assert posts[0].summary == " two spaces kept one"
    assert (posts[1].id, posts[1].summary) == ("given-id", "eos stripped")


def test_load_prompt_only(tmp_path):
    rows = [{"prompt": format_query("a", "b", "c")}, {"prompt": format_query("d", "e", "f\ng")}]
    posts, stats = load_posts(write_lines(tmp_path / "prompts.json", rows))  # .json is JSON Lines too
    assert stats.schema == "prompt"
    assert [(p.subreddit, p.title, p.post, p.summary) for p in posts] == [("a", "b", "c", None),
                                                                          ("d", "e", "f\ng", None)]


def test_load_comparisons(tmp_path):
    path = write_lines(tmp_path / "cmp.jsonl", COMPARISON_ROWS)
    comps, stats = load_comparisons(path)
    assert [c.post.id for c in comps] == ["t3_p1", "t3_p2", "t3_p1"]
    assert (stats.n_read, stats.n_kept, stats.n_dropped_cnndm, stats.n_dropped_confidence) == (4, 3, 1, 0)
    assert comps[0] == Comparison(
        post=Post("t3_p1", "AskReddit", "Title one", "Post one.\nSecond line.", None, None, f"{path}:1"),
        summaries=("first summary", "second summary"), choice=1, confidence=8, split="valid1",
        policies=("sup2", "ref"), worker="w1", batch="batch3")
    assert [c.confidence for c in comps] == [8, None, 3]
    assert [c.split for c in comps] == ["valid1", "valid1", "valid2"]  # the row's split field, no filtering

    comps, stats = load_comparisons(path, min_confidence=8)  # unknown confidence is dropped too
    assert [c.confidence for c in comps] == [8]
    assert (stats.n_dropped_cnndm, stats.n_dropped_confidence, stats.n_kept) == (1, 2, 1)

    comps, stats = load_comparisons(path, drop_cnndm=False)  # kept: the article becomes the post
    assert stats.n_dropped_cnndm == 0 and (comps[1].post.post, comps[1].post.subreddit) == (CNNDM_INFO["article"], "")


def test_comparisons_split_argument_when_rows_have_none(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in COMPARISON_ROWS]
    comps, _ = load_comparisons(write_lines(tmp_path / "cmp.jsonl", rows), split="train")
    assert {c.split for c in comps} == {"train"}


def test_load_posts_from_comparisons_dedupes(tmp_path):
    posts, stats = load_posts(write_lines(tmp_path / "cmp.jsonl", COMPARISON_ROWS))
    assert [p.id for p in posts] == ["t3_p1", "t3_p2"]  # first occurrence order; CNN/DM dropped
    assert all(p.summary is None for p in posts) and posts[0].source.endswith("cmp.jsonl:1")
    assert (stats.schema, stats.n_read, stats.n_kept, stats.n_duplicate_posts, stats.n_dropped_cnndm) == \
        ("comparisons", 4, 2, 1, 1)
    comps, _ = load_comparisons(tmp_path / "cmp.jsonl")
    assert unique_posts(comps) == posts


def test_directory_of_splits(tmp_path):
    write_lines(tmp_path / "train.jsonl", TLDR_ROWS)
    write_lines(tmp_path / "validation.jsonl", TLDR_ROWS[1:])
    assert [p.id for p in load_posts(tmp_path, "train")[0]] == ["t3_a", "t3_b"]
    posts, stats = load_posts(str(tmp_path), "validation")
    assert [p.id for p in posts] == ["t3_b"] and stats.source == str(tmp_path / "validation.jsonl")
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_posts(tmp_path, "test")
    with pytest.raises(ValueError, match="needs a split"):
        load_posts(tmp_path)


def test_round_trip_through_write_jsonl(tmp_path):
    posts, _ = load_posts(write_lines(tmp_path / "a.jsonl", TLDR_ROWS))
    back, _ = load_posts(write_jsonl(tmp_path / "b.jsonl", [post_to_row(p) for p in posts]))
    assert [(p.id, p.post, p.summary, p.facts) for p in back] == [(p.id, p.post, p.summary, p.facts) for p in posts]
    comps, _ = load_comparisons(write_lines(tmp_path / "c.jsonl", COMPARISON_ROWS))
    back, _ = load_comparisons(write_jsonl(tmp_path / "d.jsonl", [comparison_to_row(c) for c in comps]))
    for c in back + comps:
        c.post.source = ""
    assert back == comps


# ----------------------------------------------------------------------------------------------------------------
# bad input: errors name file, line and field; empty rows are skipped and counted


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", TLDR_ROWS, ['{"id": "x", "post": '])
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        load_posts(path)
    path = write_lines(tmp_path / "list.jsonl", TLDR_ROWS[:1], ["[1, 2]"])
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object"):
        load_posts(path)


def test_missing_field_names_field_and_line(tmp_path):
    rows = [TLDR_ROWS[0], {k: v for k, v in TLDR_ROWS[1].items() if k != "summary"}]
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing required field 'summary'"):
        load_posts(write_lines(tmp_path / "missing.jsonl", rows))
    bad = comparison_row({k: v for k, v in COMPARISON_INFO[0].items() if k != "id"}, " a", " b", 0, 5)
    with pytest.raises(DataError, match=r"cmp\.jsonl:2: missing required field 'info\.id'"):
        load_comparisons(write_lines(tmp_path / "cmp.jsonl", [COMPARISON_ROWS[0], bad]))
    rows = [{"prompt": format_query("a", "b", "c"), "completion": " s"}, {"prompt": format_query("a", "b", "c")}]
    with pytest.raises(DataError, match=r"trl\.jsonl:2: missing required field 'completion'"):
        load_posts(write_lines(tmp_path / "trl.jsonl", rows))


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(choice=2), r"field 'choice' must be 0 or 1, got 2"),
    (lambda r: r.update(choice=True), r"field 'choice' must be int"),
    (lambda r: r.update(choice="1"), r"field 'choice' must be int"),
    (lambda r: r["summaries"].pop(), r"field 'summaries' must hold 2 summaries, got 1"),
    (lambda r: r.update(summaries="ab"), r"field 'summaries' must be list or tuple"),
    (lambda r: r["summaries"][1].update(text=7), r"field 'summaries\[1\]\.text' must be str"),
    (lambda r: r.update(extra={"confidence": 12}), r"field 'extra\.confidence' must be in 1\.\.9"),
    (lambda r: r.update(extra={"confidence": "high"}), r"field 'extra\.confidence' must be int or null"),
    (lambda r: r.update(info={**r["info"], "title": 3}), r"field 'info\.title' must be str"),
])
def test_comparison_wrong_types(tmp_path, change, message):
    row = json.loads(json.dumps(COMPARISON_ROWS[0]))
    change(row)
    with pytest.raises(DataError, match=r"cmp\.jsonl:2: " + message):
        load_comparisons(write_lines(tmp_path / "cmp.jsonl", [COMPARISON_ROWS[2], row]))


def test_tldr_wrong_types(tmp_path):
    with pytest.raises(DataError, match=r"sft\.jsonl:2: field 'post' must be str, got int"):
        load_posts(write_lines(tmp_path / "sft.jsonl", [TLDR_ROWS[0], {**TLDR_ROWS[1], "post": 5}]))
    with pytest.raises(DataError, match=r"sft\.jsonl:1: field 'summary' must be str, got NoneType"):
        load_posts(write_lines(tmp_path / "sft.jsonl", [{**TLDR_ROWS[0], "summary": None}]))
    with pytest.raises(DataError, match=r"trl\.jsonl:1: field 'prompt': prompt is not a TL;DR query"):
        load_posts(write_lines(tmp_path / "trl.jsonl", [{"prompt": "hello", "completion": " s"}]))
    with pytest.raises(DataError, match=r"odd\.jsonl:1: unknown schema"):
        load_posts(write_lines(tmp_path / "odd.jsonl", [{"text": "hello"}]))
    with pytest.raises(DataError, match=r"sft\.jsonl:1: expected the comparisons schema"):
        load_comparisons(write_lines(tmp_path / "sft.jsonl", TLDR_ROWS))


def test_parquet_error_names_row(tmp_path):
    path = tmp_path / "cmp.parquet"
    rows = [comparison_row(COMPARISON_INFO[0], " a", " b", 0, 5), comparison_row(COMPARISON_INFO[1], " a", " b", 4, 5)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"^{path} row 1: field 'choice' must be 0 or 1"):
        load_comparisons(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        load_posts(tmp_path / "junk.parquet")


def test_empty_rows_skipped_and_counted(tmp_path):
    rows = [TLDR_ROWS[0], {**TLDR_ROWS[1], "post": " \n "}, {**TLDR_ROWS[1], "summary": " "}, TLDR_ROWS[1]]
    posts, stats = load_posts(write_lines(tmp_path / "sft.jsonl", rows, ["", "   "]))
    assert [p.id for p in posts] == ["t3_a", "t3_b"]
    assert (stats.n_read, stats.n_kept, stats.n_skipped_empty, stats.n_blank_lines) == (4, 2, 2, 2)

    rows = [COMPARISON_ROWS[0], comparison_row(COMPARISON_INFO[1], " ok", "  ", 0, 9),
            comparison_row({**COMPARISON_INFO[1], "post": "\t"}, " a", " b", 0, 9)]
    comps, stats = load_comparisons(write_lines(tmp_path / "cmp.jsonl", rows))
    assert len(comps) == 1 and (stats.n_read, stats.n_skipped_empty) == (3, 2)

    rows = [{"prompt": format_query("a", "b", "  "), "completion": " s"}, {"prompt": format_query("a", "b", "c"),
                                                                            "completion": " "}]
    posts, stats = load_posts(write_lines(tmp_path / "trl.jsonl", rows))
    assert posts == [] and stats.n_skipped_empty == 2


def test_missing_local_file_is_not_a_hub_id(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    for source in [tmp_path / "nope.jsonl", "data/nope.parquet", "./nope"]:
        with pytest.raises(FileNotFoundError):
            load_posts(source, "train")


# ----------------------------------------------------------------------------------------------------------------
# the hub branch, on an in-memory Dataset in the hub schema


def fake_hub(monkeypatch, rows):
    """Make datasets.load_dataset return rows as an in-memory Dataset; record the calls."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_comparisons(monkeypatch):
    calls = fake_hub(monkeypatch, COMPARISON_ROWS)
    comps, stats = load_comparisons("openai/summarize_from_feedback", "validation", min_confidence=8)
    assert calls == [("openai/summarize_from_feedback", "comparisons", "validation")]  # default config
    assert [(c.post.id, c.choice, c.confidence, c.summaries) for c in comps] == \
        [("t3_p1", 1, 8, ("first summary", "second summary"))]
    assert comps[0].post.source == "openai/summarize_from_feedback[validation] row 0"
    assert (stats.n_read, stats.n_dropped_cnndm, stats.n_dropped_confidence) == (4, 1, 2)
    posts, stats = load_posts("openai/summarize_from_feedback", "train")
    assert [p.id for p in posts] == ["t3_p1", "t3_p2"] and stats.n_duplicate_posts == 1


def test_hub_tldr_with_extra_columns_and_config(monkeypatch):
    rows = [{k: v for k, v in r.items() if k != "facts"} | {"query_token": [1, 2]} for r in TLDR_ROWS]
    calls = fake_hub(monkeypatch, rows)
    posts, _ = load_posts("vwxyzjn/summarize_from_feedback_tldr_3_filtered", "test", config="default")
    assert calls == [("vwxyzjn/summarize_from_feedback_tldr_3_filtered", "default", "test")]
    want = expected_tldr_posts(lambda i: f"vwxyzjn/summarize_from_feedback_tldr_3_filtered[test] row {i}")
    want[0].facts = None
    assert posts == want


def test_hub_errors_name_the_row(monkeypatch):
    fake_hub(monkeypatch, [{"prompt": format_query("a", "b", "c"), "completion": " s"},
                           {"prompt": "not a query", "completion": " s"}])
    with pytest.raises(DataError, match=r"^trl-lib/tldr\[validation\] row 1: field 'prompt'"):
        load_posts("trl-lib/tldr", "validation")


# ----------------------------------------------------------------------------------------------------------------
# query truncation


def naive_query(tokenizer, post, max_tokens):
    """The reference rule, one step at a time: cut at the last newline, else drop the last character."""
    text = post.post
    while True:
        query = format_query(post.subreddit, post.title, text)
        ids = tokenizer.encode(query, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return query, ids, text != post.post
        text = text[: text.rindex("\n")] if "\n" in text else text[:-1]


def n_tokens(tokenizer, post, text):
    return len(tokenizer.encode(format_query(post.subreddit, post.title, text), add_special_tokens=False))


def test_build_query_no_truncation(tokenizer):
    post = Post("1", "tifu", "short", "a short post\nwith two lines")
    query, ids, truncated = build_query(tokenizer, post, 512)
    assert query == format_query("tifu", "short", post.post) and not truncated
    assert ids == tokenizer.encode(query, add_special_tokens=False)
    assert tokenizer.eos_token_id not in ids  # no special tokens added


def test_build_query_newline_rule(tokenizer):
    post = Post("1", "relationships", "title", "first paragraph here\nsecond one\nthird one is the longest of all")
    limit = n_tokens(tokenizer, post, "first paragraph here\nsecond one")  # exactly fits two paragraphs
    query, ids, truncated = build_query(tokenizer, post, limit)
    assert truncated and parse_query(query)[2] == "first paragraph here\nsecond one" and len(ids) <= limit
    query, _, _ = build_query(tokenizer, post, limit - 1)  # one token less: the first paragraph only
    assert parse_query(query)[2] == "first paragraph here"


def test_build_query_character_rule_fits_and_is_maximal(tokenizer):
    post = Post("1", "relationships", "title", random_text(random.Random(1), 80))  # no newline
    header = n_tokens(tokenizer, post, "")
    for limit in [header, header + 1, header + 7, header + 30]:
        query, ids, truncated = build_query(tokenizer, post, limit)
        cut = parse_query(query)[2]
        assert truncated and post.post.startswith(cut) and len(ids) <= limit
        assert ids == tokenizer.encode(query, add_special_tokens=False)
        assert n_tokens(tokenizer, post, post.post[: len(cut) + 1]) > limit  # one more character does not fit


def test_build_query_equals_naive_rule(tokenizer):
    rng = random.Random(2)
    posts = [Post(str(i), "relationships", random_text(rng, 4), random_text(rng, rng.randint(20, 70), newline_every))
             for i, newline_every in enumerate([None, 5, 9, 30, 3, None, 12])]
    posts.append(Post("x", "tifu", "t", "\nstarts with a newline\n\nand has a blank line\n"))
    n_truncated = n_cases = 0
    for post in posts:
        header, full = n_tokens(tokenizer, post, ""), n_tokens(tokenizer, post, post.post)
        for limit in sorted({header, header + 1, header + 2, (header + full) // 2, full - 1, full, full + 5}):
            got, want = build_query(tokenizer, post, limit), naive_query(tokenizer, post, limit)
            assert got == want, (post, limit)
            n_truncated += got[2]
            n_cases += 1
    # every limit below the full length truncates: 5 of the 7 limits per post (full and full + 5 do not)
    assert n_truncated == n_cases - 2 * len(posts)


def test_build_query_is_fast_on_long_posts(tokenizer):
    calls = []

    def encode(text, add_special_tokens=True):
        calls.append(len(text))
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    post = Post("1", "relationships", "title", random_text(random.Random(3), 4000))  # ~25k chars, no newline
    counting = types.SimpleNamespace(encode=encode)
    query, ids, truncated = build_query(counting, post, 120)
    cut = parse_query(query)[2]
    assert truncated and len(ids) <= 120 and n_tokens(tokenizer, post, post.post[: len(cut) + 1]) > 120
    assert len(calls) < 100  # the one-character rule would tokenize ~25k times


def test_build_query_raises_when_nothing_fits(tokenizer):
    post = Post("1", "relationships", "a very long title " * 5, "post", source="sft.jsonl:7")
    with pytest.raises(DataError, match=r"^sft\.jsonl:7: .*even with an empty post"):
        build_query(tokenizer, post, 5)


def test_load_stats_to_dict():
    assert LoadStats(n_read=3).to_dict()["n_read"] == 3


# ----------------------------------------------------------------------------------------------------------------
# the BOS rule and the query / completion boundary


def make_sentencepiece_tokenizer(texts, vocab_size=400):
    """A Llama-2-style tokenizer built in-process, laid out like Llama-2's tokenizer.json: a normalizer that
    prepends "▁" to the text and writes every space as "▁", pieces that start at a "▁" (SentencePiece's
    split_by_whitespace), and a post-processor that puts <s> before every text, as Llama's does by default."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = [("<s>", tok.token_to_id("<s>"))]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_bos_rule_and_in_context_completion_under_sentencepiece():
    rng = random.Random(1)
    summaries = [random_text(rng, 8) for _ in range(30)]
    corpus = [format_query("relationships", random_text(rng, 6), random_text(rng, 40, 9)) + " " + s
              for s in summaries]
    tok = make_sentencepiece_tokenizer(corpus)
    bos = tok.bos_token_id
    assert special_prefix(tok) == [bos]
    post = Post("1", "relationships", "my title", "a post\nwith two lines")
    query, ids, _ = build_query(tok, post, 200)
    # the query starts with the BOS the tokenizer adds by default: exactly what tokenizer(query) gives
    assert ids[0] == bos and ids == tok(query)["input_ids"] == encode_query(tok, query)
    n_alone_differs = 0
    for s in summaries:
        completion = format_completion(s, tok.eos_token)
        c = encode_completion(tok, query, completion)
        # query + completion is the joint text's tokenization: the policy samples in that context
        assert ids + c == tok(query + completion)["input_ids"]
        assert c[-1] == tok.eos_token_id and tok.decode(c, skip_special_tokens=True).strip() == s
        n_alone_differs += c != tok.encode(completion, add_special_tokens=False)
    # encoding the completion alone splits the leading space differently ("▁" prepended again): the old rule
    assert n_alone_differs == len(summaries)


def test_bos_rule_changes_nothing_for_byte_level_bpe(tokenizer):
    assert special_prefix(tokenizer) == []
    query = format_query("relationships", "title", "post")
    assert encode_query(tokenizer, query) == tokenizer.encode(query, add_special_tokens=False)
    completion = format_completion("a summary", tokenizer.eos_token)
    assert encode_completion(tokenizer, query, completion) == tokenizer.encode(completion, add_special_tokens=False)
