"""The OpenAI-compatible labeler (minirlaif/judges.py) against a faulty fake server on 127.0.0.1: it reads the
answer when there is one, retries what may improve (429 with Retry-After, 5xx, a slow drip past the whole-request
deadline, truncated JSON, an HTML page with status 200, a reset connection), gives a null label with the reason
when the answer cannot be read (no logprobs in the top list, huge or NaN logprobs), keeps a valid answer whose
usage field is garbage, counts the tokens and attempts of failed tries, and never lets the key out (servers that
echo the request headers in an error body or an answer).

Every delay is short (client flags: backoff of milliseconds, request timeouts under a second); the server picks a
free port, answers each request in its own daemon thread and shuts itself down after `lifetime` seconds (600:
long enough for the label.py runs that use it on a loaded machine, short enough that a hung test ends)."""

import json
import math
import socket
import struct
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_judges import ITEM, prompt

from minirlaif import judges, labelers, openai_api
from minirlaif.reward import LabelerReward
from minirlaif.judges import CHOICES, PromptSpec

TOP = [("1", math.log(0.6)), (" 1", math.log(0.1)), ("2", math.log(0.2)), ("Sure", math.log(0.05))]
KEY = "sk-secret-123"


class FakeAPI:
    """A chat-completions server in a thread. `plan` lists the next requests' fates (then `default`):
      ok          a valid answer (scoring: the `top` logprobs; completion: "Summary 1 is fine.")
      429 / 500 / 503 / 401   an error status (429 with Retry-After: `retry_after`)
      timeout     a valid answer after `slow` seconds
      drip        a valid answer sent one byte every `drip` seconds (each read is quick, the whole is not)
      malformed   a 200 body of cut JSON          html       a 200 HTML page
      billed      a 200 JSON body without choices, but with usage (a paid, unusable answer)
      nologprobs  a 200 answer without logprobs   huge / nan a logprob of 1000 / NaN for "1"
      badusage    a valid answer whose usage cannot be read
      reset       the connection is reset without an answer
      echo401 / echo500   an error body that echoes the request headers (the key with them)
      echo        a 200 answer whose text (and top token) is the request's Authorization header
    It stops by itself after `lifetime` seconds, and answers 410 (not retryable) after `max_requests`."""

    def __init__(self, default="ok", delay=0.0, top=TOP, lifetime=600.0, max_requests=2000):
        self.plan, self.default, self.delay, self.top = [], default, delay, top
        self.positions = None  # d-RLAIF answers: [(chosen token, top list)] per answer position (None: one, `top`)
        self.retry_after, self.slow, self.drip, self.max_requests = "0", 1.0, 0.1, max_requests
        self.requests, self.lock = [], threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    fate = api.plan.pop(0) if api.plan else api.default
                    fate = fate if len(api.requests) < api.max_requests else "410"
                    api.requests.append({"headers": dict(self.headers), "body": body, "fate": fate})
                try:
                    api.answer(self, fate, body)
                except OSError:  # the client hung up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a dripping answer must not hold close()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.daemon = True
        self.timer.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, h, fate, body):
        ctype, headers = "application/json", {}
        if fate in ("429", "500", "503", "401", "410"):
            payload, status = json.dumps({"error": {"message": f"fake {fate}"}}).encode(), int(fate)
            if status == 429:
                headers["Retry-After"] = self.retry_after
        elif fate in ("echo401", "echo500"):
            echoed = {"error": {"message": "bad request", "request_headers": dict(h.headers)}}
            payload, status = json.dumps(echoed).encode(), int(fate[4:])
        elif fate == "malformed":
            payload, status = b'{"choices": [{"logprobs": ', 200
        elif fate == "html":
            payload, status, ctype = b"<html><body><h1>Welcome to nginx!</h1></body></html>", 200, "text/html"
        elif fate == "billed":
            payload, status = json.dumps({"usage": {"prompt_tokens": 100, "completion_tokens": 1}}).encode(), 200
        elif fate == "reset":  # SO_LINGER 0: close() sends an RST instead of a FIN
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        else:
            if fate == "timeout":
                time.sleep(self.slow)
            time.sleep(self.delay)
            payload, status = json.dumps(self.completion(fate, body, h.headers.get("Authorization", ""))).encode(), 200
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if fate != "drip":
            h.wfile.write(payload)
            return
        for i in range(len(payload)):
            h.wfile.write(payload[i:i + 1])
            h.wfile.flush()
            time.sleep(self.drip)

    def completion(self, fate, body, auth):
        scoring = body.get("logprobs")
        text = auth if fate == "echo" else "1" if scoring else "Summary 1 is fine."
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        top = {"huge": [("1", 1000.0), ("2", -1.0)], "nan": [("1", math.nan), ("2", -1.0)],
               "echo": [(auth, -0.01), ("Sure", -5.0)]}.get(fate, self.top)
        if scoring and fate != "nologprobs":
            content = []
            for chosen, tl in self.positions or [(None, top)]:
                tl = [{"token": t, "logprob": lp} for t, lp in tl[: body["top_logprobs"]]]
                content.append({"token": chosen or (tl[0]["token"] if tl else "x"), "logprob": -0.1,
                                "top_logprobs": tl})
            choice["logprobs"] = {"content": content[: body["max_tokens"]]}
        usage = {"prompt_tokens": 100, "completion_tokens": 1 if scoring else 7, "total_tokens": 0}
        if fate == "badusage":
            usage = {"prompt_tokens": "a hundred", "completion_tokens": None}
        return {"id": "x", "choices": [choice], "usage": usage}

    def close(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = FakeAPI()
    yield server
    server.close()


def client(url, **kw):
    opts = dict(spec=PromptSpec("base"), max_concurrency=2, max_retries=6, retry_base_delay=0.001,
                retry_max_delay=0.01, request_timeout=0.3)
    return openai_api.OpenAILabeler(url, "fake-model", **{**opts, **kw})


def score(lab):
    (r,) = lab.choice_probs(["p"], CHOICES)
    return r


P1 = 0.7 / 0.9  # ("1" + " 1") / ("1" + " 1" + "2") of TOP


# ----------------------------------------------------------------------------------------------------------------
# answers that can be read


def test_openai_reads_both_spellings_from_top_logprobs_and_sums_usage(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lab = client(api.url)
    rows = judges.judge_pairs(lab, [ITEM, {**ITEM, "id": "p2"}])
    for r in rows:
        assert r["p_a_ab"] == pytest.approx(P1) and r["p_a_ba"] == pytest.approx(1 - P1)
        assert r["mass_ab"] == pytest.approx(0.9) and r["p_a"] == pytest.approx(0.5)
        assert r["usage"] == {"prompt_tokens": 200, "completion_tokens": 2, "requests": 2, "usage_unknown": 0}
    req = api.requests[0]
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert body["temperature"] == 0.0 and body["model"] == "fake-model"
    assert sorted(r["body"]["messages"][0]["content"] for r in api.requests)[0] in \
        {prompt("base"), judges.build_prompt(judges.judge_text(ITEM), ITEM["summary_b"], ITEM["summary_a"], "base")}
    assert lab.usage == {"requests": 4, "retries": 0, "prompt_tokens": 400, "completion_tokens": 4,
                         "usage_unknown": 0}
    cost = judges.usage_summary(rows, price_input_per_1m=2.5, price_output_per_1m=10.0)
    assert cost == {"prompt_tokens": 400, "completion_tokens": 4, "requests": 4, "usage_unknown": 0,
                    "estimated_cost": pytest.approx(400 * 2.5e-6 + 4e-5)}
    assert KEY not in repr(lab) and KEY not in json.dumps(lab.usage)


def test_openai_cot_sends_the_rationale_back(api):
    lab = client(api.url, spec=PromptSpec("base", cot=True, cot_max_tokens=64))
    (row,) = judges.judge_pairs(lab, [ITEM], orders="ab")
    assert row["rationale_ab"] == "Summary 1 is fine."
    first, second = api.requests[0]["body"], api.requests[1]["body"]
    assert first["max_tokens"] == 64 and "logprobs" not in first
    assert second["messages"][0]["content"] == judges.cot_scoring_prompt(prompt("base", cot=True), "Summary 1 is fine.")
    assert row["usage"] == {"prompt_tokens": 200, "completion_tokens": 8, "requests": 2, "usage_unknown": 0}


def test_openai_self_consistency_samples_each_rationale_with_its_own_seed(api):
    lab = client(api.url, spec=PromptSpec("base", cot=True, cot_max_tokens=16, sc_samples=2, sc_temperature=0.7),
                 seed=4)
    (row,) = judges.judge_pairs(lab, [ITEM], orders="ab")
    rationale = [r["body"] for r in api.requests if not r["body"].get("logprobs")]
    assert sorted(b["seed"] for b in rationale) == sorted(judges.rationale_seed(4, {"id": "p1", "order": "ab"}, k)
                                                          for k in range(2))
    assert all(b["temperature"] == 0.7 and "top_k" not in b for b in rationale)  # the API has no top-k
    assert row["rationale_ab"] == ["Summary 1 is fine."] * 2 and row["p_a"] == pytest.approx(P1)
    assert row["usage"]["requests"] == 4


def test_openai_answer_outside_top_logprobs_is_null_with_reason():
    server = FakeAPI(top=[("Summary", math.log(0.5)), ("The", math.log(0.3))])
    try:
        (row,) = judges.judge_pairs(client(server.url), [ITEM])
    finally:
        server.close()
    assert row["p_a"] is None and row["p_a_ab"] is None and row["mass_ab"] == 0.0
    assert "ab: neither of ['1', '2'] in the top-2 logprobs (top token 'Summary')" in row["null_reason"]


# ----------------------------------------------------------------------------------------------------------------
# retried: 429 (Retry-After), 5xx, timeouts, drips, cut JSON, HTML, resets


def test_openai_retries_429_5xx_timeouts_malformed_html_and_resets(api):
    api.plan = ["429", "500", "503", "timeout", "malformed", "html", "nologprobs", "reset"]
    lab = client(api.url, max_retries=8)
    r = score(lab)
    assert r["probs"][0] == pytest.approx(P1)
    assert lab.usage["retries"] == 8 and len(api.requests) == 9
    # 9 attempts; the tokens of two answers: the one without logprobs (billed, unusable) and the good one
    assert r["usage"] == {"prompt_tokens": 200, "completion_tokens": 2, "requests": 9, "usage_unknown": 0}


def test_openai_honours_retry_after(api):
    api.plan, api.retry_after = ["429"], "0.4"
    t0 = time.monotonic()
    assert score(client(api.url, retry_max_delay=1.0))["probs"][0] == pytest.approx(P1)
    assert time.monotonic() - t0 >= 0.4  # the backoff alone would be a millisecond (Retry-After is capped at
    # --retry-max-delay)


def test_openai_timeout_is_a_deadline_for_the_whole_request(api):
    # a byte every 0.05 s: every read is far inside the 0.3 s timeout, the whole answer (about 300 bytes) is not
    api.default, api.drip = "drip", 0.05
    lab = client(api.url, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(openai_api.APIError, match="giving up after 2 attempts.*TimeoutError: no complete answer within "
                                              "the 0.3 s request timeout"):
        score(lab)
    assert time.monotonic() - t0 < 2.0  # 2 attempts of 0.3 s (was: 15 s a request, then a label)
    api.plan, api.default = ["drip"], "ok"  # one drip, then an answer
    assert score(lab)["probs"][0] == pytest.approx(P1)


def test_openai_gives_up_with_a_clear_error_and_no_label(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    api.default = "500"
    lab = client(api.url, max_retries=2)
    with pytest.raises(openai_api.APIError, match=r"giving up after 3 attempts \(0 prompt and 0 completion tokens "
                                              r"billed\); last error: HTTP 500"):
        judges.judge_pairs(lab, [ITEM], orders="ab")
    api.default = "timeout"
    with pytest.raises(openai_api.APIError, match="giving up after 3 attempts.*last error: TimeoutError"):
        score(lab)
    api.default = "billed"  # paid for, unusable: the tokens are in the error
    with pytest.raises(openai_api.APIError, match=r"\(300 prompt and 3 completion tokens billed\); last error: "
                                              r"malformed response: KeyError"):
        score(lab)
    api.default = "reset"
    with pytest.raises(openai_api.APIError, match="last error: (ConnectionResetError|RemoteDisconnected)"):
        score(lab)


def test_openai_does_not_retry_a_client_error(api):
    api.plan = ["401"]
    with pytest.raises(openai_api.APIError, match="HTTP 401 .not retryable"):
        score(client(api.url))
    assert len(api.requests) == 1


# ----------------------------------------------------------------------------------------------------------------
# answers that are there but wrong: no made-up label, no thrown-away answer, no uncounted cost


def test_huge_and_nan_logprobs_are_a_null_label_with_the_reason(api):
    for fate, shown in (("huge", "1000.0"), ("nan", "nan")):
        api.plan = [fate, fate]
        (row,) = judges.judge_pairs(client(api.url), [ITEM])
        assert row["p_a"] is None and row["p_a_ab"] is None and row["p_a_ba"] is None
        assert row["null_reason"] == (f"ab: the API returned an invalid logprob {shown}; "
                                      f"ba: the API returned an invalid logprob {shown}")
    assert len(api.requests) == 4  # a broken answer, not a flaky one: not retried


def test_an_unreadable_usage_keeps_the_answer_and_is_counted_unknown(api):
    api.plan = ["badusage"]
    lab = client(api.url)
    r = score(lab)
    assert len(api.requests) == 1  # kept, not thrown away and paid for again
    assert r["probs"][0] == pytest.approx(P1)
    assert r["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "requests": 1, "usage_unknown": 1}
    assert lab.usage["usage_unknown"] == 1 and lab.usage["retries"] == 0


def test_the_tokens_and_attempts_of_failed_tries_are_in_the_row(api):
    api.plan = ["500", "billed", "billed"]
    (row,) = judges.judge_pairs(client(api.url), [ITEM], orders="ab")
    assert row["p_a"] == pytest.approx(P1)
    # 500: an attempt without tokens; each billed body: 100 + 1 tokens; then the answer: 100 + 1
    assert row["usage"] == {"prompt_tokens": 300, "completion_tokens": 3, "requests": 4, "usage_unknown": 0}
    assert judges.usage_summary([row])["requests"] == 4


# ----------------------------------------------------------------------------------------------------------------
# the key never gets out


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("fate", ["echo401", "echo500"])
def test_the_key_is_redacted_from_errors_that_echo_the_request_headers(api, monkeypatch, fate):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    api.default = fate
    with pytest.raises(openai_api.APIError) as e:
        score(client(api.url, max_retries=1))
    assert KEY in json.dumps(api.requests[-1]["headers"])  # the server did echo it
    assert "[REDACTED]" in str(e.value) and "Authorization" in str(e.value)
    assert KEY not in full_text(e.value)


def test_the_key_is_redacted_from_answers_that_echo_it(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    api.default = "echo"
    lab = client(api.url, spec=PromptSpec("base", cot=True, cot_max_tokens=8))
    (row,) = judges.judge_pairs(lab, [ITEM], orders="ab")
    assert row["rationale_ab"] == "Bearer [REDACTED]"
    assert row["null_reason"] == "ab: neither of ['1', '2'] in the top-2 logprobs (top token 'Bearer [REDACTED]')"
    assert KEY not in json.dumps(row)


# ----------------------------------------------------------------------------------------------------------------
# d-RLAIF ratings 1..10 through the API


def test_api_ratings_read_single_token_numbers_and_10_split_after_a_chosen_1(api):
    """Ratings spelled as one token are read from the first position; a "1" the model chose is 1 only when no digit
    follows it (second position), and "1" + "0" is 10. The expected rating is then exact (hand-computed)."""
    lab = client(api.url)
    # a tokenizer with single-token numbers: " 7" chosen; "0" after it would make 70, which is no rating
    api.positions = [(" 7", [(" 7", math.log(0.5)), (" 8", math.log(0.3)), ("10", math.log(0.1)),
                             (" 1", math.log(0.05)), ("Sure", math.log(0.05))]),
                     (None, [("\n", math.log(0.9)), ("0", math.log(0.1))])]
    (r,) = lab.rating_probs(["p"])
    raw = {7: 0.5 - 0.5 * 0.1, 8: 0.3, 10: 0.1, 1: 0.05}
    want = [raw.get(i, 0.0) / sum(raw.values()) for i in judges.RATINGS]
    assert r["probs"] == pytest.approx(want, abs=1e-12) and r["mass"] == pytest.approx(sum(raw.values()))
    assert api.requests[-1]["body"]["max_tokens"] == 2 and api.requests[-1]["body"]["logprobs"] is True
    # a tokenizer that splits 10: "1" chosen, then "0" (10), "5" (15: no rating) or the end (1)
    api.positions = [("1", [("1", math.log(0.6)), ("9", math.log(0.3)), ("Sure", math.log(0.1))]),
                     (None, [("0", math.log(0.5)), ("\n", math.log(0.4)), ("5", math.log(0.1))])]
    (r,) = lab.rating_probs(["p"])
    raw = {1: 0.6 * (1 - 0.5 - 0.1), 10: 0.6 * 0.5, 9: 0.3}
    assert r["probs"] == pytest.approx([raw.get(i, 0.0) / sum(raw.values()) for i in judges.RATINGS], abs=1e-12)
    expected = (1 * raw[1] + 10 * raw[10] + 9 * raw[9]) / sum(raw.values())
    (reward,) = labelers.direct_scores(lab, [{**ITEM, "summary": ITEM["summary_a"]}])
    assert reward == pytest.approx((expected - 5.5) / 4.5, abs=1e-12)
    # no rating among the top tokens: a null rating with the reason, not a guess
    api.positions = [("Sure", [("Sure", -0.1), ("The", -3.0)])]
    (r,) = lab.rating_probs(["p"])
    assert r["probs"] is None and "no rating among the top-2" in r["null_reason"]


def test_a_failed_rating_request_is_an_unrated_episode_never_a_made_up_reward(api):
    api.default = "500"
    rewards = LabelerReward(client(api.url, max_retries=1), tokenizer=None)
    items = [{**ITEM, "summary": ITEM["summary_a"]}, {**ITEM, "summary": ITEM["summary_b"]}]
    assert rewards.rate(items) == [None, None]
    assert rewards.calls == 2 and rewards.unrated == 2 and len(api.requests) == 4  # two attempts each
    (row,) = client(api.url, max_retries=0).rating_probs(["p"])
    assert row["probs"] is None and "HTTP 500" in row["null_reason"]
