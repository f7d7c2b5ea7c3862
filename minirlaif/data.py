"""Data loading and formatting for every stage: every source normalised to one internal form.

Internal form: `Post` (one Reddit post, with its reference summary when the source has one) and `Comparison`
(one human comparison of two summaries of a post). Every stage reads these, whatever the source was.

Sources (`source` argument of the loaders):
  * a local file: `.jsonl` or `.json` (JSON Lines, parsed here line by line so an error names file and line),
    or `.parquet` (read with pyarrow; an error names file and row);
  * a local directory holding `{split}.jsonl`, `{split}.json` or `{split}.parquet`;
  * anything else is a Hugging Face hub id, loaded with `datasets.load_dataset(hub_id, name=config, split=split)`
    (`datasets` is imported only then; `openai/summarize_from_feedback` gets config "comparisons" by default).

Schemas (detected from the first row's keys; every later row must carry that schema's required fields):
  * "tldr"               vwxyzjn/summarize_from_feedback_tldr_3_filtered: id, subreddit, title, post, summary
                         (+ an optional `facts` column that only the synthetic task's files carry);
  * "prompt_completion"  trl-lib/tldr: prompt (a formatted query, parsed back), completion (" " + summary);
  * "prompt"             prompt-only rows (PPO prompt sets): the summary is None;
  * "comparisons"        openai/summarize_from_feedback, config `comparisons`;
  * "hh"                 Anthropic/hh-rlhf (helpful-base, harmless-base): chosen, rejected (two whole dialogues
                         sharing every turn but the last Assistant response; `dialogue.split_hh` splits them, a
                         row whose sides diverge earlier is a DataError), + optional id, `facts` and `confidence`
                         (1-9) columns that only the synthetic dialogue task's files carry. As posts: the dialogue
                         up to its last Human turn, the chosen response as the reference (the dialogue tasks'
                         SFT data); as comparisons: (chosen, rejected) with choice 0.

Normalisation is minimal on purpose: posts and titles are kept verbatim (no strip, no cut at "TL;DR:", a defect
of the seed); a summary loses one leading space and one trailing EOS string, so that
format_completion(summary, eos) rebuilds the reference completion exactly.

Bad input raises DataError; its message starts with the location: "path:LINE:" for JSON Lines (1-based, as in an
editor), "path row N:" for parquet and "hub_id[split] row N:" for the hub (0-based, as in `ds[N]`). A row with an
empty (whitespace-only) post or summary is skipped and counted in LoadStats: nothing is dropped silently.

Decisions:
  * A local file is one split: `split` does not filter its rows. (The hub's `split` column says "valid1" or
    "valid2" inside the "validation" split, so filtering by equality would drop a whole dumped validation file.)
    Comparison.split is the row's `split` field when it has one, else the `split` argument, else "".
  * Blank lines in JSON Lines are not data: skipped, and counted in LoadStats.n_blank_lines.
  * min_confidence drops rows whose confidence is unknown (None): they are not known to meet the bar.
  * With drop_cnndm=False a CNN/DM row is kept with its article as the post (subreddit "", title or "").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
# inverse of QUERY_FORMAT: the subreddit is one line, the title ends at the first "\n\nPOST: ", the post runs to
# the final "\n\nTL;DR:" (greedy), so a post that itself contains "TL;DR:" is parsed back whole
_QUERY_RE = re.compile(
    r"SUBREDDIT: r/(?P<subreddit>[^\n]*)\n\nTITLE: (?P<title>.*?)\n\nPOST: (?P<post>.*)\n\nTL;DR:", re.DOTALL)
# EOS strings a stored summary or completion may end with (GPT-2, Llama 2, Llama 3, ChatML)
EOS_STRINGS = ("<|endoftext|>", "</s>", "<|eot_id|>", "<|im_end|>")
# hub datasets that need a config name to load
HUB_DEFAULT_CONFIGS = {"openai/summarize_from_feedback": "comparisons"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# build_query's search assumes appending text never lowers the token count by more than this many tokens
TRUNCATION_SLACK = 8


# ----------------------------------------------------------------------------------------------------------------
# internal form


@dataclass
class Post:
    """One Reddit post with its reference summary (an SFT row, or a prompt row when summary is None)."""
    id: str
    subreddit: str
    title: str
    post: str
    summary: str | None = None   # reference summary without the leading space and any EOS; None if the source has none
    facts: dict | None = None    # latent facts of the offline synthetic task; None for real data
    source: str = ""             # "path:line" or "hub_id[split] row N", for error messages downstream


@dataclass
class Comparison:
    """One human comparison of two summaries of a post (openai/summarize_from_feedback `comparisons` form)."""
    post: Post                   # post.summary is None
    summaries: tuple[str, str]   # normalised like Post.summary
    choice: int                  # 0 or 1: index of the human-preferred summary
    confidence: int | None       # extra.confidence (1-9), None when absent
    split: str
    policies: tuple[str, str]
    worker: str | None = None
    batch: str | None = None


@dataclass
class LoadStats:
    """What a loader read and what it left out, and why (every row read lands in exactly one bucket)."""
    n_read: int = 0                 # data rows read (blank lines not included)
    n_kept: int = 0                 # items returned
    n_skipped_empty: int = 0        # rows with an empty (whitespace-only) post or summary
    n_dropped_cnndm: int = 0        # CNN/DM comparison rows (info.post is None)
    n_dropped_confidence: int = 0   # comparison rows below min_confidence, or with unknown confidence
    n_duplicate_posts: int = 0      # load_posts on comparisons: rows whose post was already seen
    n_blank_lines: int = 0          # blank lines in JSON Lines files (not data, not in n_read)
    schema: str = ""                # the detected schema
    source: str = ""                # the file or hub split actually read

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class DataError(ValueError):
    """Bad input data; the message starts with where it is ("path:line:", "path row N:", "hub_id[split] row N:")."""


# ----------------------------------------------------------------------------------------------------------------
# formatting


def format_query(subreddit: str, title: str, post: str) -> str:
    """The TL;DR query of OpenAI / the N+ implementation details; the policy writes the summary after "TL;DR:"."""
    return QUERY_FORMAT.format(subreddit=subreddit, title=title, post=post)


def format_completion(summary: str, eos_token: str) -> str:
    """The reference completion: a space (the query ends with "TL;DR:") + summary + EOS, so the model learns to stop."""
    return " " + summary + eos_token


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default: Llama's and Gemma's BOS; none for GPT-2,
    Qwen2, SmolLM2 or our in-process BPE. A suffix it may add (an EOS) is not part of it."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return list(full[:start])


def encode_query(tokenizer, query: str) -> list[int]:
    """A query's token ids under the BOS rule: the tokenizer's own start tokens (its BOS when it adds one by
    default, so a Llama-family policy sees the BOS it was pretrained with), then the text without special tokens."""
    return special_prefix(tokenizer) + tokenizer.encode(query, add_special_tokens=False)


def encode_completion(tokenizer, query: str, completion: str) -> list[int]:
    """A completion's token ids as they follow `query`: the tokens of `query + completion` after the query's.

    Encoding the completion alone can split it differently from the joint text (a SentencePiece tokenizer with a
    Metaspace pre-tokenizer reads " summary" alone as "▁" + "▁summary" or "▁▁summary", but as "▁summary" after
    "TL;DR:"), and the policy samples in context, so training and scoring use the in-context split. When the
    joint text's tokens do not start with the query's (a token would span the boundary; our query ends with
    "TL;DR:" and completions start with a space, so real tokenizers do not), the completion is encoded alone.
    No special tokens are added (the EOS is part of the completion's text).
    """
    q = tokenizer.encode(query, add_special_tokens=False)
    joint = tokenizer.encode(query + completion, add_special_tokens=False)
    if joint[:len(q)] == q:
        return joint[len(q):]
    return tokenizer.encode(completion, add_special_tokens=False)


def parse_query(prompt: str) -> tuple[str, str, str]:
    """(subreddit, title, post) of a formatted query: the inverse of format_query, for trl-lib/tldr prompts.

    Exact for every post; ambiguous only for a title that itself contains "\\n\\nPOST: " (the first one wins).
    """
    m = _QUERY_RE.fullmatch(prompt)
    if m is None:
        raise DataError(f"prompt is not a TL;DR query ({QUERY_FORMAT!r}): {prompt[:60]!r}...")
    return m["subreddit"], m["title"], m["post"]


def normalize_summary(text: str) -> str:
    """A stored summary or completion -> the internal summary: drop one trailing EOS string, then one leading space."""
    for eos in EOS_STRINGS:
        if text.endswith(eos):
            text = text[: -len(eos)]
            break
    # exactly one space: format_completion adds it back; any other whitespace is the summary's own
    return text[1:] if text.startswith(" ") else text


def build_query(tokenizer, post: Post, max_query_tokens: int) -> tuple[str, list[int], bool]:
    """(query, query token ids, truncated): the post's query, with the post cut until it fits max_query_tokens.

    The rule (OpenAI / N+ details): while the query is too long, cut the post at its last newline if it has one,
    else drop its last character, and retokenize. That rule tries, longest first, the cuts at each newline and
    then every character prefix of the first line, and keeps the first that fits: the longest cut that fits. We
    find that cut without retokenizing once per character: a binary search finds a cut whose query is over the
    limit by more than TRUNCATION_SLACK tokens (then, assuming appending text never lowers the token count by more
    than that, no longer cut fits), and a scan downwards from there finds the first cut that fits. The result
    always fits and the next longer cut does not; it equals the one-character-at-a-time rule whenever the
    assumption holds (for BPE on real text it does: only the last few tokens of a prefix can merge).
    The ids follow the BOS rule (`encode_query`: the tokenizer's own start tokens, counted in the limit). Raises
    DataError when even the empty post does not fit.
    """
    text = post.post
    ids_of: dict[int, list[int]] = {}  # post prefix length -> token ids of its query (each tokenized once)
    prefix = special_prefix(tokenizer)

    def n_tokens(k: int) -> int:
        if k not in ids_of:
            ids_of[k] = prefix + tokenizer.encode(format_query(post.subreddit, post.title, text[:k]),
                                                  add_special_tokens=False)
        return len(ids_of[k])

    if n_tokens(len(text)) <= max_query_tokens:  # the common case: one tokenization, no cut
        return format_query(post.subreddit, post.title, text), ids_of[len(text)], False
    if n_tokens(0) > max_query_tokens:
        raise DataError(f"{post.source or post.id}: the query does not fit in {max_query_tokens} tokens even with an "
                        f"empty post ({n_tokens(0)} tokens for subreddit and title)")
    # every cut the rule can try, shortest first: each character prefix of the first line, then each newline
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    cuts = list(range(newlines[0] if newlines else len(text))) + newlines
    # binary search: cuts[lo] is within the slack (cut 0, the empty post, fits); no cut from index hi on fits
    lo, hi = 0, len(cuts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if n_tokens(cuts[mid]) > max_query_tokens + TRUNCATION_SLACK:
            hi = mid
        else:
            lo = mid
    # scan down from the longest cut that may fit; cut 0 fits, so this ends
    best = next(cuts[i] for i in range(hi - 1, -1, -1) if n_tokens(cuts[i]) <= max_query_tokens)
    return format_query(post.subreddit, post.title, text[:best]), ids_of[best], True


# ----------------------------------------------------------------------------------------------------------------
# reading rows from a source: (location, row dict) pairs


def _looks_local(source: str) -> bool:
    """A path the user meant as local (so a missing file is a FileNotFoundError, not a hub download attempt)."""
    return source.endswith(LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~")) or os.path.isabs(source)


def _split_file(directory: Path, split: str | None) -> Path:
    """The file of `split` in a local directory: {split}.jsonl, {split}.json or {split}.parquet (exactly one)."""
    if split is None:
        raise ValueError(f"{directory}: a directory source needs a split (it holds one file per split)")
    found = [directory / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES if (directory / f"{split}{suffix}").is_file()]
    if len(found) != 1:
        have = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"{directory}: expected exactly one of {split}.jsonl / {split}.json / {split}.parquet, "
                                f"found {[p.name for p in found] if found else have}")
    return found[0]


def _jsonl_rows(path: Path, stats: LoadStats) -> Iterator[tuple[str, dict]]:
    """Rows of a JSON Lines file, parsed line by line so an error names the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = f"{path}:{lineno}"
            if not raw.strip():
                stats.n_blank_lines += 1
                continue
            try:
                row = json.loads(raw)  # bytes: json decodes UTF-8 itself, and a bad byte is a ValueError here too
            except ValueError as e:
                raise DataError(f"{loc}: malformed JSON line ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{loc}: expected a JSON object per line, got {type(row).__name__}")
            yield loc, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet file, read in batches so a large file never sits in memory as Python objects at once."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: cannot read parquet file ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _hub_rows(hub_id: str, split: str | None, config: str | None) -> Iterator[tuple[str, dict]]:
    """Rows of a Hugging Face hub dataset split (imports `datasets` only here: nothing to pay without the hub)."""
    if split is None:
        raise ValueError(f"{hub_id}: a hub dataset needs a split")
    import datasets

    ds = datasets.load_dataset(hub_id, name=config or HUB_DEFAULT_CONFIGS.get(hub_id), split=split)
    i = 0
    for batch in ds.iter(batch_size=1024):  # columnar batches: much faster than ds[i] row by row
        columns = list(batch)
        for j in range(len(batch[columns[0]]) if columns else 0):
            yield f"{hub_id}[{split}] row {i}", {c: batch[c][j] for c in columns}
            i += 1


def _rows(source: str | os.PathLike, split: str | None, config: str | None,
          stats: LoadStats) -> Iterator[tuple[str, dict]]:
    """(location, row) of every data row of a source: local file, local directory of splits, or hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = _split_file(path, split)
    if path.is_file():
        stats.source = str(path)
        if path.suffix in (".jsonl", ".json"):
            yield from _jsonl_rows(path, stats)
        elif path.suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(LOCAL_SUFFIXES)})")
        return
    if _looks_local(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory")
    stats.source = f"{source}[{split}]"
    yield from _hub_rows(str(source), split, config)


# ----------------------------------------------------------------------------------------------------------------
# checking fields


def _field(row: dict, name: str, loc: str, prefix: str = "", optional: bool = False) -> Any:
    """row[name]; a missing key is a DataError naming the field, unless optional (then None)."""
    if name not in row:
        if optional:
            return None
        raise DataError(f"{loc}: missing required field '{prefix}{name}'")
    return row[name]


def _check(value: Any, kind: type | tuple, name: str, loc: str, nullable: bool = False) -> Any:
    """value if it has the expected type (None allowed when nullable); else a DataError naming the field."""
    if value is None and nullable:
        return None
    if kind is int:
        # JSON written by pandas can hold 8.0 for 8; a bool is an int to Python but never a valid count or index
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{loc}: field '{name}' must be {want}{' or null' if nullable else ''}, "
                        f"got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _text(row: dict, name: str, loc: str, prefix: str = "", nullable: bool = False) -> str | None:
    """A required string field."""
    return _check(_field(row, name, loc, prefix), str, prefix + name, loc, nullable)


def _empty(text: str | None) -> bool:
    return text is not None and not text.strip()


# ----------------------------------------------------------------------------------------------------------------
# one row -> internal form


def _detect_schema(row: dict, loc: str) -> str:
    """The schema of a row, from its keys (the first row decides for the whole source)."""
    keys = set(row)
    if {"info", "summaries"} <= keys:
        return "comparisons"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    if "prompt" in keys:
        return "prompt_completion" if "completion" in keys else "prompt"
    if "post" in keys:
        return "tldr"
    raise DataError(f"{loc}: unknown schema, keys {sorted(keys)}; expected tldr (id, subreddit, title, post, "
                    f"summary), prompt[/completion], comparisons (info, summaries, choice) or hh (chosen, rejected)")


def _hh_from_row(row: dict, loc: str) -> tuple[Post, str, str, int | None]:
    """(the dialogue as a Post with the chosen response as its reference, chosen, rejected, confidence) of an
    Anthropic HH row; responses normalised like summaries (one leading space and a trailing EOS string off)."""
    from minirlaif.dialogue import split_hh  # (dialogue.py imports this module)

    context, chosen, rejected = split_hh(_text(row, "chosen", loc), _text(row, "rejected", loc), loc)
    row_id = _check(row.get("id"), str, "id", loc, nullable=True)
    # the hub rows have no id: a hash of the dialogue is stable, and rows repeating a dialogue share it
    row_id = row_id if row_id is not None else "hh-" + hashlib.sha1(context.encode()).hexdigest()[:16]
    confidence = _check(row.get("confidence"), int, "confidence", loc, nullable=True)
    if confidence is not None and not 1 <= confidence <= 9:
        raise DataError(f"{loc}: field 'confidence' must be in 1..9, got {confidence}")
    chosen, rejected = normalize_summary(chosen), normalize_summary(rejected)
    post = Post(id=row_id, subreddit="", title="", post=context, summary=chosen,
                facts=_check(row.get("facts"), dict, "facts", loc, nullable=True), source=loc)
    return post, chosen, rejected, confidence


def _post_from_row(row: dict, loc: str, schema: str) -> Post:
    """A Post from a row of the tldr, prompt_completion or prompt schema."""
    if schema == "tldr":
        facts = _check(_field(row, "facts", loc, optional=True), dict, "facts", loc, nullable=True)
        return Post(id=_text(row, "id", loc), subreddit=_text(row, "subreddit", loc), title=_text(row, "title", loc),
                    post=_text(row, "post", loc), summary=normalize_summary(_text(row, "summary", loc)),
                    facts=facts, source=loc)
    prompt = _text(row, "prompt", loc)
    try:
        subreddit, title, post = parse_query(prompt)
    except DataError as e:
        raise DataError(f"{loc}: field 'prompt': {e}") from None
    summary = normalize_summary(_text(row, "completion", loc)) if schema == "prompt_completion" else None
    # trl-lib/tldr has no id column: a hash of the prompt is stable across runs and machines
    row_id = _check(row.get("id"), str, "id", loc, nullable=True)
    row_id = row_id if row_id is not None else "prompt-" + hashlib.sha1(prompt.encode()).hexdigest()[:16]
    return Post(id=row_id, subreddit=subreddit, title=title, post=post, summary=summary, source=loc)


def _comparison_from_row(row: dict, loc: str, split: str | None, drop_cnndm: bool,
                         stats: LoadStats) -> Comparison | None:
    """A Comparison from a comparisons row, or None (counted in stats) for a CNN/DM or empty row.

    The whole row is checked first, so a malformed row is an error even when a filter would have dropped it.
    """
    info = _check(_field(row, "info", loc), dict, "info", loc)
    post_text = _check(_field(info, "post", loc, "info."), str, "info.post", loc, nullable=True)
    is_cnndm = post_text is None  # CNN/DM rows carry an article instead of a post
    if is_cnndm and not drop_cnndm:
        post_text = _text(info, "article", loc, "info.")
    post = Post(
        id=_text(info, "id", loc, "info."),
        # a CNN/DM row has no subreddit and may have no title
        subreddit=_text(info, "subreddit", loc, "info.", nullable=is_cnndm) or "",
        title=_text(info, "title", loc, "info.", nullable=is_cnndm) or "",
        post=post_text or "",
        facts=_check(info.get("facts"), dict, "info.facts", loc, nullable=True),
        source=loc,
    )
    summaries = _check(_field(row, "summaries", loc), (list, tuple), "summaries", loc)
    if len(summaries) != 2:
        raise DataError(f"{loc}: field 'summaries' must hold 2 summaries, got {len(summaries)}")
    texts, policies = [], []
    for k, s in enumerate(summaries):
        s = _check(s, dict, f"summaries[{k}]", loc)
        texts.append(normalize_summary(_text(s, "text", loc, f"summaries[{k}].")))
        policies.append(_check(s.get("policy"), str, f"summaries[{k}].policy", loc, nullable=True) or "")
    choice = _check(_field(row, "choice", loc), int, "choice", loc)
    if choice not in (0, 1):
        raise DataError(f"{loc}: field 'choice' must be 0 or 1, got {choice}")
    extra = _check(row.get("extra"), dict, "extra", loc, nullable=True) or {}
    confidence = _check(extra.get("confidence"), int, "extra.confidence", loc, nullable=True)
    if confidence is not None and not 1 <= confidence <= 9:
        raise DataError(f"{loc}: field 'extra.confidence' must be in 1..9, got {confidence}")
    row_split = _check(row.get("split"), str, "split", loc, nullable=True)
    comparison = Comparison(
        post=post, summaries=(texts[0], texts[1]), choice=choice, confidence=confidence,
        split=row_split if row_split is not None else (split or ""), policies=(policies[0], policies[1]),
        worker=_check(row.get("worker"), str, "worker", loc, nullable=True),
        batch=_check(row.get("batch"), str, "batch", loc, nullable=True),
    )
    # filters, in this order, each row counted in exactly one bucket
    if is_cnndm and drop_cnndm:
        stats.n_dropped_cnndm += 1
        return None
    if _empty(post.post) or any(_empty(t) for t in texts):
        stats.n_skipped_empty += 1
        return None
    return comparison


# ----------------------------------------------------------------------------------------------------------------
# loaders


def load_posts(source: str | os.PathLike, split: str | None = None,
               config: str | None = None) -> tuple[list[Post], LoadStats]:
    """Posts (SFT rows, or prompts for PPO / evaluation) from any supported schema, in source order.

    tldr rows and prompt/completion rows carry their reference summary; prompt-only rows have summary None;
    a comparisons source gives its unique TL;DR posts (first occurrence order, summary None); an hh source its
    unique dialogues (first occurrence order, the chosen response as the reference; repeats counted).
    """
    stats = LoadStats()
    posts: list[Post] = []
    comparisons: list[Comparison] = []
    seen_ids: set[str] = set()
    for loc, row in _rows(source, split, config, stats):
        if not stats.schema:
            stats.schema = _detect_schema(row, loc)
        stats.n_read += 1
        if stats.schema == "comparisons":
            comparison = _comparison_from_row(row, loc, split, True, stats)
            if comparison is not None:
                comparisons.append(comparison)
            continue
        if stats.schema == "hh":
            post = _hh_from_row(row, loc)[0]
            if _empty(post.post) or _empty(post.summary):
                stats.n_skipped_empty += 1
            elif post.id in seen_ids:  # one dialogue twice: one prompt (ids key every cache downstream)
                stats.n_duplicate_posts += 1
            else:
                seen_ids.add(post.id)
                posts.append(post)
            continue
        post = _post_from_row(row, loc, stats.schema)
        if _empty(post.post) or _empty(post.summary):
            stats.n_skipped_empty += 1
            continue
        posts.append(post)
    if stats.schema == "comparisons":
        posts = unique_posts(comparisons)
        stats.n_duplicate_posts = len(comparisons) - len(posts)
    stats.n_kept = len(posts)
    return posts, stats


def load_comparisons(source: str | os.PathLike, split: str | None = None, drop_cnndm: bool = True,
                     min_confidence: int | None = None,
                     config: str | None = None) -> tuple[list[Comparison], LoadStats]:
    """Human comparisons (openai/summarize_from_feedback `comparisons` schema), in source order.

    drop_cnndm: drop CNN/DM rows (info.post is None), counted; this pipeline is about Reddit TL;DR.
    min_confidence: keep only rows with extra.confidence >= it (unknown confidence is dropped), counted.
    """
    stats = LoadStats(schema="")
    out: list[Comparison] = []
    for loc, row in _rows(source, split, config, stats):
        if stats.n_read == 0:
            stats.schema = _detect_schema(row, loc)
            if stats.schema not in ("comparisons", "hh"):
                raise DataError(f"{loc}: expected the comparisons schema (info, summaries, choice) or hh (chosen, "
                                f"rejected), found keys {sorted(row)}")
        stats.n_read += 1
        if stats.schema == "hh":
            comparison = _hh_comparison(row, loc, split, stats)
        else:
            comparison = _comparison_from_row(row, loc, split, drop_cnndm, stats)
        if comparison is None:
            continue
        if min_confidence is not None and (comparison.confidence is None or comparison.confidence < min_confidence):
            stats.n_dropped_confidence += 1
            continue
        out.append(comparison)
    stats.n_kept = len(out)
    return out, stats


def _hh_comparison(row: dict, loc: str, split: str | None, stats: LoadStats) -> Comparison | None:
    """An HH row as a Comparison of (chosen, rejected), choice 0; None (counted) when a side is empty."""
    post, chosen, rejected, confidence = _hh_from_row(row, loc)
    if _empty(post.post) or _empty(chosen) or _empty(rejected):
        stats.n_skipped_empty += 1
        return None
    post = dataclasses.replace(post, summary=None)
    return Comparison(post=post, summaries=(chosen, rejected), choice=0, confidence=confidence, split=split or "",
                      policies=("chosen", "rejected"))


def unique_posts(comparisons: list[Comparison]) -> list[Post]:
    """The distinct posts of comparisons, deduplicated by post id, in first-occurrence order (the first wins)."""
    seen: dict[str, Post] = {}
    for c in comparisons:
        seen.setdefault(c.post.id, c.post)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------------------
# writing (the synthetic task, and stages that write data for the next one, use the hub schemas too)


def post_to_row(post: Post) -> dict:
    """A Post as a tldr-schema row (+ facts when it has them); load_posts reads it back equal (but for source)."""
    row = {"id": post.id, "subreddit": post.subreddit, "title": post.title, "post": post.post, "summary": post.summary}
    if post.facts is not None:
        row["facts"] = post.facts
    return row


def comparison_to_row(c: Comparison) -> dict:
    """A Comparison as a comparisons-schema row; load_comparisons reads it back equal (but for source)."""
    info = {"id": c.post.id, "post": c.post.post, "title": c.post.title, "subreddit": c.post.subreddit,
            "site": None, "article": None}
    if c.post.facts is not None:
        info["facts"] = c.post.facts
    return {
        "info": info,
        "summaries": [{"text": t, "policy": p, "note": None} for t, p in zip(c.summaries, c.policies)],
        "choice": c.choice, "worker": c.worker, "batch": c.batch, "split": c.split,
        "extra": {"confidence": c.confidence},
    }


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    """Write rows (dicts or dataclasses) as JSON Lines, through a temp file + rename so a reader never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            row = dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
