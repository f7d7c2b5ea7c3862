"""An OpenAI-compatible chat-completions endpoint as a labeler, over http.client (no extra dependency).

Requests run concurrently and are retried with backoff (429 honouring Retry-After, 5xx, resets, malformed bodies);
the timeout is a deadline for a whole request; invalid logprobs give a null label with the reason; every attempt's
tokens are counted; the key comes from OPENAI_API_KEY only and is redacted from everything a server sends back.
The faults are tested against a fake server in tests/test_api_faults.py.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import random
import socket
import threading
import time
import urllib.parse

from minirlaif.judges import RATINGS, USAGE_KEYS, PromptSpec, lm_judge, normalise

class APIError(RuntimeError):
    """An API request failed for good: a non-retryable status, or the retry budget is spent."""


# statuses worth retrying: rate limits, timeouts and server errors; others (400, 401, 404, ...) will not improve
_RETRY_STATUS = {408, 409, 429}
MAX_BODY_BYTES = 8 * 2**20  # a chat-completions answer of one token or one rationale is a few kB


class _Retry(Exception):
    """A failed attempt worth retrying; its message (already redacted) is the last error reported."""


def redact(obj, secret: str):
    """`obj` (str, or dicts / lists of them) with every occurrence of `secret` replaced by [REDACTED]."""
    if not secret:
        return obj
    if isinstance(obj, str):
        return obj.replace(secret, "[REDACTED]")
    if isinstance(obj, dict):
        return {k: redact(v, secret) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, secret) for v in obj]
    return obj


def _read_usage(answer) -> tuple[dict, bool]:
    """Token counts of a 200 answer, and whether they could be read (a valid answer is kept either way)."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    try:
        counts = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens")}
        if all(v >= 0 for v in counts.values()):
            return counts, True
    except (TypeError, KeyError, ValueError, OverflowError):
        pass
    return {"prompt_tokens": 0, "completion_tokens": 0}, False


def _logprob(x) -> float:
    """A top-logprob value, checked: a number <= 0 (-inf allowed). Raises ValueError on anything else (NaN, a
    positive "logprob" of 1000 that math.exp would overflow on)."""
    lp = float(x)  # raises on non-numbers
    if math.isnan(lp) or lp > 1e-4:  # 1e-4: rounding of a probability of 1
        raise ValueError(f"invalid logprob {x!r}")
    return min(lp, 0.0)


class OpenAILabeler:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM's server, llama.cpp, ...), via http.client.

    Each prompt is one user message. Scoring requests ask for one token with `logprobs` and `top_logprobs` and
    read "1" / "2" from the top list; rationales are greedy (temperature 0) completions. Requests run
    `max_concurrency` at a time; 429 / 5xx / timeouts / connection errors / malformed bodies are retried with
    exponential backoff and full jitter (honouring Retry-After), then raise APIError. `request_timeout` is a
    deadline for the whole request (connect, send, every byte of the answer), not for each read. Invalid
    logprobs (NaN, positive) give a null label with the reason, not a retry and not a guess. Every attempt's
    tokens are counted in the row's usage (failed but billed attempts too), with the number of attempts
    (`requests`, answered or not) and of answers whose usage could not be read (`usage_unknown`).

    The key comes from the environment variable OPENAI_API_KEY only, is never printed or stored, and is redacted
    from everything a server sends back (error bodies that echo the request headers, answers) before it is
    raised, returned or written.
    """

    def __init__(self, api_base: str, model: str, spec: PromptSpec | None = None, top_logprobs: int = 20,
                 max_concurrency: int = 8, max_retries: int = 6, retry_base_delay: float = 1.0,
                 retry_max_delay: float = 60.0, request_timeout: float = 60.0, seed: int = 0):
        if not model:
            raise ValueError("the openai labeler needs --api-model")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.spec, self.top_logprobs, self.seed = model, spec or PromptSpec(), top_logprobs, seed
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.base_delay, self.max_delay, self.timeout = retry_base_delay, retry_max_delay, request_timeout
        self._key = os.environ.get("OPENAI_API_KEY", "")
        self._lock, self._jitter = threading.Lock(), random.Random()
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "usage_unknown": 0}

    def judge(self, queries):
        return lm_judge(self, queries)

    def __repr__(self):  # never show the key
        return f"OpenAILabeler(url={self.url!r}, model={self.model!r})"

    def _count(self, **kw):
        with self._lock:
            for k, v in kw.items():
                self.usage[k] += v

    def _request(self, data: bytes, headers: dict) -> tuple[int, object, bytes]:
        """One POST -> (status, headers, body), all of it within `self.timeout` seconds.

        Why a timer: a socket timeout bounds each read only, so a server sending a byte every 0.4 s would hold
        a request for ever at timeout 1. At the deadline the timer shuts the socket down, which wakes the
        blocked read; what was read by then is thrown away.
        """
        url = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname, url.port, timeout=self.timeout)
        expired, sock = threading.Event(), []

        def expire():
            expired.set()
            for s in sock:  # the plain socket's shutdown (an SSL socket's own would drop its state under the read)
                try:
                    socket.socket.shutdown(s, socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.start()
        try:
            try:
                conn.connect()
                sock.append(conn.sock)  # kept: the connection drops its reference once the response is read
                if expired.is_set():  # the deadline passed while connecting, before there was a socket to shut
                    raise TimeoutError
                conn.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=data, headers=headers)
                resp = conn.getresponse()
                body = resp.read(MAX_BODY_BYTES + 1)
            except (OSError, http.client.HTTPException):
                if expired.is_set():
                    raise TimeoutError(f"no complete answer within the {self.timeout} s request timeout") from None
                raise
            if expired.is_set():  # a read cut by the shutdown can look like the end of a body without a length
                raise TimeoutError(f"no complete answer within the {self.timeout} s request timeout")
            if len(body) > MAX_BODY_BYTES:
                raise ValueError(f"answer longer than {MAX_BODY_BYTES} bytes")
            return resp.status, resp.headers, body
        finally:
            timer.cancel()
            conn.close()

    def _post(self, body: dict, parse):
        """POST a request and parse its JSON answer with `parse` (which raises on a malformed body), retrying.
        -> (parsed answer, usage of all attempts: {prompt_tokens, completion_tokens, requests, usage_unknown})."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        spent = dict.fromkeys(USAGE_KEYS, 0)  # over every attempt of this request
        last, retry_after = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
                delay = self._jitter.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                time.sleep(max(delay, min(retry_after, self.max_delay)) if retry_after else delay)
            retry_after = 0.0
            spent["requests"] += 1  # every attempt, answered or not (a timed-out request may be billed too)
            self._count(requests=1)
            try:
                try:
                    status, resp_headers, raw = self._request(data, headers)
                except (TimeoutError, ConnectionError, OSError, http.client.HTTPException, ValueError) as e:
                    raise _Retry(f"{type(e).__name__}: {e}") from None
                if status != 200:
                    detail = redact(raw[:4096].decode("utf-8", "replace"), self._key)[:300]
                    if status not in _RETRY_STATUS and status < 500:
                        raise APIError(f"{self.url}: HTTP {status} (not retryable): {detail}")
                    try:
                        retry_after = float(resp_headers.get("Retry-After") or 0)
                    except ValueError:
                        retry_after = 0.0
                    raise _Retry(f"HTTP {status}: {detail}")
                try:
                    answer = json.loads(raw)
                except ValueError as e:  # incl. JSONDecodeError and bad UTF-8: an HTML page, a cut body
                    raise _Retry(f"malformed response: {type(e).__name__}: {e}") from None
                usage, known = _read_usage(answer)
                for k, v in {**usage, "usage_unknown": int(not known)}.items():  # billed even if malformed
                    spent[k] += v
                self._count(**usage, usage_unknown=int(not known))
                try:
                    return redact(parse(answer), self._key), spent
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    raise _Retry(f"malformed response: {type(e).__name__}: {e}") from None
            except _Retry as e:
                last = redact(str(e), self._key)
        raise APIError(f"{self.url}: giving up after {self.max_retries + 1} attempts ({spent['prompt_tokens']} "
                       f"prompt and {spent['completion_tokens']} completion tokens billed); last error: {last}")

    def _map(self, fn, xs):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.max_concurrency))
        try:
            return list(pool.map(fn, xs))
        finally:  # on an error, requests not yet started are cancelled; those in flight finish
            pool.shutdown(wait=True, cancel_futures=True)

    def _body(self, prompt: str, **kw) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                "seed": self.seed, **kw}

    def choice_probs(self, prompts, choices):
        variants = [(c, " " + c) for c in choices]

        def parse(answer):
            first = answer["choices"][0]["logprobs"]["content"][0]
            top = [(t["token"], t["logprob"]) for t in first["top_logprobs"]]
            try:
                top = [(tok, _logprob(lp)) for tok, lp in top]
            except ValueError as e:  # a broken server, not a flaky one: no retry, and no made-up label
                return {"probs": None, "mass": None, "null_reason": f"the API returned an {e}"}
            raw = [sum(math.exp(lp) for tok, lp in top if tok in v) for v in variants]
            best = max(top, key=lambda t: t[1])[0] if top else None
            return normalise(raw, f"neither of {list(choices)} in the top-{len(top)} logprobs (top token {best!r})")

        def one(prompt):
            result, usage = self._post(self._body(prompt, max_tokens=1, logprobs=True,
                                                  top_logprobs=self.top_logprobs), parse)
            return {**result, "usage": usage}

        return self._map(one, prompts)

    def rating_probs(self, prompts, ratings=RATINGS):
        """P(rating) after each prompt (d-RLAIF), from a greedy answer of two tokens with their top logprobs.

        The first position's top list gives every rating the API's tokenizer spells as one token (" 7", "10").
        The second position's list is conditional on the token the model chose first; when that is a rating
        ("1"), it gives P(no digit follows), so "1" counts as 1 only that often, and P("1" + "0") goes to 10.
        Exact for tokenizers that spell 1..10 as single tokens (OpenAI's since cl100k, Llama 3). Where "10" is
        split and the answer does not begin with "1", P("0" | "1") is not in the answer and rating 1 keeps all of
        P("1"): for such models use the hf or vllm labeler, which score every rating as a continuation. A
        request that fails for good (APIError) gives a null rating with the reason, never a made-up one."""
        names = {str(r): r for r in ratings}

        def parse(answer):
            content = answer["choices"][0]["logprobs"]["content"]
            try:
                tops = [[(t["token"], _logprob(t["logprob"])) for t in pos["top_logprobs"]] for pos in content[:2]]
            except ValueError as e:  # a broken server, not a flaky one: no retry, and no made-up rating
                return {"probs": None, "mass": None, "null_reason": f"the API returned an {e}"}
            raw = dict.fromkeys(ratings, 0.0)
            for tok, lp in tops[0]:
                if tok.strip() in names:
                    raw[names[tok.strip()]] += math.exp(lp)
            chosen = content[0]["token"]
            if len(tops) > 1 and chosen.strip() in names:  # what follows the chosen rating token
                p_chosen = sum(math.exp(lp) for tok, lp in tops[0] if tok == chosen)
                digits = [(tok, math.exp(lp)) for tok, lp in tops[1] if tok[:1].isdigit()]
                raw[names[chosen.strip()]] -= p_chosen * sum(p for _, p in digits)  # a longer number, not this one
                for tok, p in digits:
                    if chosen.strip() + tok in names:  # "1" + "0"
                        raw[names[chosen.strip() + tok]] += p_chosen * p
            best = max(tops[0], key=lambda t: t[1])[0] if tops[0] else None
            return normalise([max(raw[r], 0.0) for r in ratings],
                             f"no rating among the top-{len(tops[0])} logprobs (top token {best!r})")

        def one(prompt):
            try:
                result, usage = self._post(self._body(prompt, max_tokens=2, logprobs=True,
                                                      top_logprobs=self.top_logprobs), parse)
            except APIError as e:
                return {"probs": None, "mass": None, "null_reason": str(e), "usage": None}
            return {**result, "usage": usage}

        return self._map(one, prompts)

    def complete(self, prompts, max_tokens, temperature=0.0, top_k=0, seeds=None):
        """Greedy rationales, or one sample each at `temperature` seeded by seeds[i] (the chat-completions API has
        no top-k: `top_k` is not sent)."""
        def parse(answer):
            text = answer["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}, not text")
            return text

        def one(i):
            sampling = {"temperature": temperature, "seed": seeds[i]} if temperature > 0 else {}
            text, usage = self._post(self._body(prompts[i], max_tokens=max_tokens, **sampling), parse)
            return {"text": text, "usage": usage}

        return self._map(one, range(len(prompts)))
