"""annotate.py against a local OpenAI-compatible server that misbehaves on purpose, and the data-set normalisers
on small files in each upstream layout (tests/fixtures/)."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import annotate as A
import cli
import stg

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk-test-SECRET-4242"
GARBAGE = "I am sorry, I cannot help with that."


# ----------------------------------------------------------------------------- a scripted chat server
def make_records(n: int) -> list[dict]:
    return [{"input": f"Item {i}: Ann has {i} apples and buys 3 more. How many apples? Answer: ",
             "target": f"{i + 3}.0", "id": i} for i in range(n)]


def good_reply(i: int) -> str:
    """Two valid pairs and one phrase that is not in the text (dropped)."""
    return json.dumps({f"{i} apples": ["Ann has"], f"{i + 3}.0": [f"{i} apples", "3 more", "not in the text"]})


class ChatServer:
    """ThreadingHTTPServer on 127.0.0.1, port 0. script(i, n, body, headers) -> (status, headers, payload | reply
    text, sleep seconds) for the n-th request about record i; requests are counted per record."""

    def __init__(self, script, usage=(100, 50)):
        self.script, self.usage = script, usage
        self.calls, self.log, self.lock = Counter(), [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                i = int(re.search(r"Item (\d+):", body["messages"][-1]["content"]).group(1))
                with server.lock:
                    server.calls[i] += 1
                    server.log.append((i, body, time.monotonic()))
                    n = server.calls[i]
                status, headers, payload, sleep = server.script(i, n, body, dict(self.headers))
                time.sleep(sleep)
                if isinstance(payload, str):       # a reply text: wrap it as a chat completion
                    payload = {"choices": [{"message": {"role": "assistant", "content": payload}}],
                               "usage": {"prompt_tokens": server.usage[0], "completion_tokens": server.usage[1]}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass                           # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(600, self.httpd.shutdown)   # stops by itself if a test hangs

    def __enter__(self):
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(i, n, body, headers):
    return 200, {}, good_reply(i), 0


def config(tmp_path, server, records, **kw) -> A.AnnotateConfig:
    inp = tmp_path / "in.jsonl"
    cli.write_jsonl(inp, records)
    defaults = dict(task="mawps", inp=str(inp), out=str(tmp_path / "out.jsonl"), base_url=server.url if server
                    else "http://127.0.0.1:9/v1", model="test-model", api_key_env="CAT_TEST_KEY", timeout=5.0,
                    backoff_base=0.01, backoff_max=0.05, concurrency=8)
    return A.AnnotateConfig(**{**defaults, **kw})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("CAT_TEST_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")     # the test server is local, whatever proxy is set


def ids(path) -> list[int]:
    return [r["id"] for r in stg.read_records(path)] if Path(path).exists() else []


def assert_no_key(tmp_path, *texts):
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), f"API key written to {path}"
    for text in texts:
        assert KEY not in text, "API key in the captured output"


# ----------------------------------------------------------------------------- robustness
def test_misbehaving_server_every_record_once_and_calls_bounded(tmp_path, capfd):
    """200 records, 8 in flight: 429 (Retry-After 0), 500, 502 twice, a timeout, fenced JSON, garbage once,
    garbage always (echoing the key), {} always. Each record lands once in out or rejects, with an exact call count."""
    expected_calls = {0: 2, 1: 2, 2: 3, 4: 1, 5: 2, 6: 2, 7: 2}            # by i % 10; the rest 1
    timeouts = {3, 13, 23, 33}

    def script(i, n, body, headers):
        kind = i % 10
        if kind == 0 and n == 1:
            return 429, {"Retry-After": "0"}, {"error": {"message": "Rate limit reached", "type": "requests"}}, 0
        if kind == 1 and n == 1:
            return 500, {}, {"error": {"message": "internal"}}, 0
        if kind == 2 and n <= 2:
            return 502, {}, {"error": {"message": "bad gateway"}}, 0
        if i in timeouts and n == 1:
            return 200, {}, good_reply(i), 3.0                            # client timeout is 2 s
        if kind == 4:
            return 200, {}, f"Here you go:\n```json\n{good_reply(i)}\n```\nHope this helps.", 0
        if kind == 5 and n == 1:
            return 200, {}, GARBAGE, 0
        if kind == 6:
            return 200, {}, f"{GARBAGE} You sent {headers.get('Authorization')}", 0
        if kind == 7:
            return 200, {}, "{}", 0
        return ok(i, n, body, headers)

    records = make_records(200)
    with ChatServer(script) as server:
        stats = A.annotate(config(tmp_path, server, records, timeout=2.0))
    out, rejects = ids(tmp_path / "out.jsonl"), ids(tmp_path / "out.rejects.jsonl")
    assert sorted(out + rejects) == list(range(200)), "every record exactly once in out or rejects"
    assert sorted(rejects) == [i for i in range(200) if i % 10 in (6, 7)]
    want = {i: 2 if i in timeouts else expected_calls.get(i % 10, 1) for i in range(200)}
    assert dict(server.calls) == want
    assert stats["annotated"] == 160 and stats["rejected"] == 40 and stats["failed"] == 0
    assert stats["dropped_phrases"] == 160                                 # "not in the text", once per record
    assert stats["tokens_in"] == 100 * (200 + 3 * 20)                    # usage of every reply that came back
    by_id = {r["id"]: r for r in stg.read_records(tmp_path / "out.jsonl")}
    assert by_id[14]["important"] == [{"14 apples": ["Ann has"]}, {"17.0": ["14 apples", "3 more"]}]
    assert all(body.get("response_format") == {"type": "json_object"} for _, body, _ in server.log)
    reject = next(r for r in stg.read_records(tmp_path / "out.rejects.jsonl") if r["id"] == 6)
    assert GARBAGE in reject["raw"] and "[API key]" in reject["raw"] and reject["error"]
    captured = capfd.readouterr()
    assert_no_key(tmp_path, captured.out, captured.err)


def test_usage_tokens_and_running_cost(tmp_path):
    """Tokens come from the server's usage fields; cost = tokens x price per 1M."""
    with ChatServer(ok, usage=(1000, 500)) as server:
        stats = A.annotate(config(tmp_path, server, make_records(6), price_in=2.5, price_out=10.0))
    assert (stats["tokens_in"], stats["tokens_out"]) == (6000, 3000)
    assert stats["cost"] == pytest.approx((6000 * 2.5 + 3000 * 10.0) / 1e6)


def test_unauthorised_stops_without_retries(tmp_path, capfd):
    def script(i, n, body, headers):
        return 401, {}, {"error": {"message": f"Incorrect API key provided: {headers.get('Authorization')}"}}, 0

    with ChatServer(script) as server:
        with pytest.raises(A.FatalAPIError) as err:
            A.annotate(config(tmp_path, server, make_records(50)))
    assert "401" in str(err.value) and "CAT_TEST_KEY" in str(err.value)
    assert max(server.calls.values()) == 1 and sum(server.calls.values()) <= 8, "no retries, no new requests"
    assert ids(tmp_path / "out.jsonl") == []
    assert_no_key(tmp_path, str(err.value), *capfd.readouterr())


def test_quota_exhausted_is_fatal_but_rate_limit_is_retried(tmp_path):
    def script(i, n, body, headers):
        if i == 0 and n == 1:
            return 429, {}, {"error": {"message": "slow down", "type": "rate_limit"}}, 0
        if i == 1:
            return 429, {}, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}, 0
        return ok(i, n, body, headers)

    with ChatServer(script) as server:
        with pytest.raises(A.FatalAPIError, match="quota"):
            A.annotate(config(tmp_path, server, make_records(2), concurrency=1))
    assert server.calls == {0: 2, 1: 1}
    assert ids(tmp_path / "out.jsonl") == [0]


def test_retry_after_is_honoured(tmp_path):
    def script(i, n, body, headers):
        return (429, {"Retry-After": "1"}, {"error": {"message": "wait"}}, 0) if n == 1 else ok(i, n, body, headers)

    with ChatServer(script) as server:
        A.annotate(config(tmp_path, server, make_records(1)))
    (_, _, t0), (_, _, t1) = server.log
    assert t1 - t0 >= 0.95, "waited the server's Retry-After, not the 0.01 s backoff"


def test_server_without_json_mode(tmp_path):
    def script(i, n, body, headers):
        if "response_format" in body:
            return 400, {}, {"error": {"message": "response_format json_object is not supported"}}, 0
        return ok(i, n, body, headers)

    with ChatServer(script) as server:
        stats = A.annotate(config(tmp_path, server, make_records(10), concurrency=1))
    assert stats["annotated"] == 10 and sum(server.calls.values()) == 11   # one refusal, then plain requests


def test_exhausted_retries_are_not_rejects(tmp_path):
    """A record the server never answers is not paid for: it stays pending and is asked on the next run."""
    def script(i, n, body, headers):
        return (503, {}, {"error": {"message": "overloaded"}}, 0) if i == 1 else ok(i, n, body, headers)

    with ChatServer(script) as server:
        stats = A.annotate(config(tmp_path, server, make_records(3), max_retries=2))
    assert server.calls[1] == 3 and stats["failed"] == 1
    assert sorted(ids(tmp_path / "out.jsonl")) == [0, 2] and ids(tmp_path / "out.rejects.jsonl") == []


def test_max_cost_stops_before_the_budget(tmp_path, capsys):
    with ChatServer(ok, usage=(1000, 500)) as server:      # 0.002 a record at 1.0 / 2.0 per 1M
        stats = A.annotate(config(tmp_path, server, make_records(20), concurrency=1, price_in=1.0, price_out=2.0,
                                  max_cost=0.0101))
    assert stats["annotated"] == 5 and stats["cost"] == pytest.approx(0.010) and "max-cost" in stats["stopped"]
    (tmp_path / "four").mkdir()
    with ChatServer(ok, usage=(1000, 500)) as server:
        stats = A.annotate(config(tmp_path / "four", server, make_records(40), concurrency=4, price_in=1.0,
                                  price_out=2.0, max_cost=0.03))
    assert stats["cost"] <= 0.03 and stats["annotated"] < 40


def test_dry_run_calls_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CAT_TEST_KEY")
    stats = A.annotate(config(tmp_path, None, make_records(3), model="gpt-4o", dry_run=True))
    printed = capsys.readouterr().out
    assert "Item 0: Ann has 0 apples" in printed and "##demo" in printed and "USD" in printed
    assert stats["pending"] == 3 and not (tmp_path / "out.jsonl").exists()


def test_user_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(cli.InputError, match="--price-in"):
        A.annotate(config(tmp_path, None, make_records(1), max_cost=1.0))
    with pytest.raises(cli.InputError, match="no prompt template for task 'stg_e'"):
        A.annotate(config(tmp_path, None, make_records(1), task="stg_e"))
    monkeypatch.delenv("CAT_TEST_KEY")
    with pytest.raises(cli.InputError, match="CAT_TEST_KEY"):
        A.annotate(config(tmp_path, None, make_records(1)))


# ----------------------------------------------------------------------------- resuming
def test_half_written_last_line_is_cut_and_asked_again(tmp_path):
    records = make_records(4)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({**records[0], "important": [{"0 apples": ["Ann has"]}]}) + "\n"
                   + json.dumps({**records[1], "important": []})[:30])    # killed mid-write
    with ChatServer(ok) as server:
        A.annotate(config(tmp_path, server, records))
    assert sorted(ids(out)) == [0, 1, 2, 3] and set(server.calls) == {1, 2, 3}


def test_killed_run_resumes_without_asking_twice(tmp_path):
    """annotate.py as a subprocess, SIGKILLed after some answers, then run again to the end."""
    def script(i, n, body, headers):
        return (200, {}, GARBAGE, 0.02) if i % 7 == 0 else (200, {}, good_reply(i), 0.02)

    records = make_records(120)
    cfg = config(tmp_path, None, records)
    env = {**os.environ, "CAT_TEST_KEY": KEY}

    def command(server):
        return [sys.executable, str(ROOT / "annotate.py"), "annotate", "--task", "mawps", "--in", cfg.inp,
                "--out", cfg.out, "--base-url", server.url, "--model", "test-model", "--api-key-env", "CAT_TEST_KEY",
                "--concurrency", "4", "--backoff-base", "0.01"]

    gate, asked = threading.Event(), itertools.count(1)

    def held(i, n, body, headers):   # from the 41st request on, no answer until the run is killed: however slow the
        if next(asked) > 40:         # machine, the kill lands mid-run
            gate.wait(300)
        return script(i, n, body, headers)

    out, rejects = tmp_path / "out.jsonl", tmp_path / "out.rejects.jsonl"
    with ChatServer(held) as server:
        proc = subprocess.Popen(command(server), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300       # a bound against hanging only
        while sum(server.calls.values()) < 40 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        gate.set()
        first_out, first_err = proc.communicate(timeout=300)
        assert proc.returncode != 0, "killed mid-run"
    for path in (out, rejects):
        A.done_keys(path)                 # cuts a line the kill left half-written, as the restart will
    answered = set(ids(out)) | set(ids(rejects))
    assert 10 <= len(answered) < 120
    with ChatServer(script) as server:
        second = subprocess.run(command(server), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert not answered & set(server.calls), "an answered record was asked again"
    assert sorted(ids(out) + ids(rejects)) == list(range(120)), "each record exactly once"
    assert sorted(ids(rejects)) == list(range(0, 120, 7))
    assert_no_key(tmp_path, first_out, first_err, second.stdout, second.stderr)


def test_interrupt_keeps_the_replies_in_flight(tmp_path, ctrl_c):
    """Ctrl-C asks nothing more but writes every reply already on its way: nothing paid is lost."""
    cfg = config(tmp_path, None, make_records(60))
    gate, asked = threading.Event(), itertools.count(1)

    def held(i, n, body, headers):   # from the 7th request on, no answer before Ctrl-C: the run cannot end first
        if next(asked) > 6:
            gate.wait(300)
        return 200, {}, good_reply(i), 0.3

    with ChatServer(held) as server:
        proc = subprocess.Popen([sys.executable, str(ROOT / "annotate.py"), "annotate", "--task", "mawps",
                                 "--in", cfg.inp, "--out", cfg.out, "--base-url", server.url, "--model", "m",
                                 "--api-key-env", "CAT_TEST_KEY", "--concurrency", "4"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300       # a bound against hanging only
        while sum(server.calls.values()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        gate.set()                              # the replies on their way arrive after Ctrl-C
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "interrupted" in err
    assert sorted(ids(cfg.out)) == sorted(server.calls) and len(server.calls) < 60


def test_ctrl_c_while_a_reply_is_written_loses_nothing(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C lands wherever the loop is, here in the middle of writing the first reply (not while it waits for the
    next): that reply and every one on its way are written, nothing more is asked, and the run says it was
    interrupted. A second Ctrl-C stops at once."""
    sent = []
    write = A.append_line

    def write_with_ctrl_c(f, line):
        if not sent:
            sent.append(line)
            os.kill(os.getpid(), signal.SIGINT)   # delivered to this (the main) thread before the write below
        write(f, line)

    monkeypatch.setattr(A, "append_line", write_with_ctrl_c)
    cfg = config(tmp_path, None, make_records(60), concurrency=4)
    before = signal.getsignal(signal.SIGINT)
    with ChatServer(lambda i, n, body, headers: (200, {}, good_reply(i), 0.2)) as server:
        stats = A.annotate(A.AnnotateConfig(**{**vars(cfg), "base_url": server.url}))
    assert sent and stats["stopped"] == "interrupted"
    assert sorted(ids(cfg.out)) == sorted(server.calls) and 1 < len(server.calls) < 60
    assert signal.getsignal(signal.SIGINT) is before and stats["annotated"] == len(server.calls)
    stats = {"stopped": None}
    with pytest.raises(KeyboardInterrupt):
        with A.ctrl_c_stops(threading.Event(), stats):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)                         # the first asks the loop to stop
            assert stats["stopped"] == "interrupted"
            os.kill(os.getpid(), signal.SIGINT)     # the second stops at once
            time.sleep(1)


# ----------------------------------------------------------------------------- replies and prompts
@pytest.mark.parametrize("task", sorted(A.TEMPLATES))
def test_demo_annotations_point_into_their_demo(task):
    """Appendix B's handwritten demos are valid annotations of their own text: nothing dropped."""
    t = A.TEMPLATES[task]
    important, dropped = A.parse_annotation(json.dumps(t.output), t.demo)
    assert dropped == 0 and important == [{k: v} for k, v in t.output.items()]
    prompt = A.build_prompt(task, {"input": "Item 1: Q? Answer: ", "target": "1.0"})
    assert prompt.startswith(t.task) and prompt.endswith("Item 1: Q? Answer: 1.0") and t.demo in prompt


def test_parse_annotation_extracts_validates_and_counts():
    text = "Tom has 3 cats and 2 dogs. How many pets? Answer: 5.0"
    reply = 'Sure!\n```json\n{"5.0": ["3 cats", "2 dogs", "a horse"], "pets": "How many", "zebra": ["Tom"]}\n```'
    important, dropped = A.parse_annotation(reply, text)
    assert important == [{"5.0": ["3 cats", "2 dogs"]}, {"pets": ["How many"]}] and dropped == 3
    assert A.parse_annotation('{"TOM HAS": ["3 cats"], "5.0": [3]}', text)[0] == [{"TOM HAS": ["3 cats"]},
                                                                               {"5.0": ["3"]}]
    assert A.parse_annotation('{"5.0": ["3 cats"], "5.0": ["2 dogs"]}', text)[0] == [{"5.0": ["3 cats"]},
                                                                                   {"5.0": ["2 dogs"]}]
    for bad in ("no json here", "{}", '{"5.0": {"nested": 1}}', '{"zebra": ["horse"]}', '{"5.0": [1, [2]]}'):
        with pytest.raises(ValueError):
            A.parse_annotation(bad, text)


def test_appendix_d_cost_figures():
    """Appendix D: per 1M input tokens, GPT-4o ~$18.19 and ChatGLM-4-air ~1.09 CNY."""
    tokens_in, tokens_out = A.PROMPT_RATIO * 1e6, A.COMPLETION_RATIO * 1e6
    assert A.cost(tokens_in, tokens_out, A.price_for("gpt-4o-2024-08-06")) == pytest.approx(18.19, abs=0.01)
    assert A.cost(tokens_in, tokens_out, A.price_for("GLM-4-Air")) == pytest.approx(1.09, abs=0.01)
    assert A.price_for("my-local-model") is None and A.price_for("x", 1.0, 2.0) == (1.0, 2.0, "")


# ----------------------------------------------------------------------------- data sets
HUB_FIXTURES = {   # task -> split -> fixture in that repository's layout (the hub files are parquet)
    "gsm8k": {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"},
    "arc_e": {"train": "arc_easy_train.jsonl", "validation": "arc_easy_validation.jsonl",
              "test": "arc_easy_test.jsonl"},
    "svamp": {"train": "svamp_train.json", "test": "svamp_test.json"},
    "mawps": {"train": "calc_mawps_train.jsonl", "validation": "calc_mawps_validation.jsonl",
              "test": "calc_mawps_test.jsonl"},
    "asdiv": {"all": "asdiv.jsonl"},
}


@pytest.fixture
def fake_hub(monkeypatch):
    """list_repo_files / hf_hub_download answered from tests/fixtures (the hub is not reachable in tests)."""
    import huggingface_hub
    asked = []

    def list_repo_files(self, repo_id, repo_type=None, revision=None, **kw):
        task = next(t for t, s in A.SOURCES.items() if s.repo == repo_id)
        assert repo_type == "dataset" and revision == A.SOURCES[task].revision
        return [pattern.replace("*", "00000-of-00001") for pattern in A.SOURCES[task].files.values()] + ["README.md"]

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None, **kw):
        asked.append((repo_id, filename, revision))
        task = next(t for t, s in A.SOURCES.items() if s.repo == repo_id)
        split = next(k for k, p in A.SOURCES[task].files.items() if p.replace("*", "00000-of-00001") == filename)
        return str(FIXTURES / HUB_FIXTURES[task][split])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return asked


def fetched(task, tmp_path, sources=None) -> dict[str, list[dict]]:
    paths = A.fetch(task, sources, tmp_path)
    assert list(paths) == ["train", "val", "test"] and all(p.name == f"{task}_{s}.jsonl" for s, p in paths.items())
    return {split: stg.read_records(path) for split, path in paths.items()}


def test_fetch_gsm8k_keeps_test_and_carves_val(fake_hub, tmp_path):
    data = fetched("gsm8k", tmp_path)
    assert [len(data[s]) for s in A.SPLITS] == [3, 1, 2]                 # a quarter of train is validation
    natalia = next(r for r in data["train"] + data["val"] if "Natalia" in r["input"])
    assert natalia["input"].endswith("in April and May? Answer: ")
    assert natalia["target"].startswith("Natalia sold 48/2 = <<48/2=24>>24") and natalia["target"].endswith("#### 72")
    assert data["test"][0] == {"input": "Sam buys 4 apples at $2 each. How much does he pay? Answer: ",
                               "target": "He pays 4*2 = <<4*2=8>>8 dollars.\n#### 8"}
    assert ("openai/gsm8k", "main/train-00000-of-00001.parquet", "main") in fake_hub


def test_fetch_arc_easy_letters(fake_hub, tmp_path):
    data = fetched("arc_e", tmp_path)
    assert [len(data[s]) for s in A.SPLITS] == [2, 1, 1]
    fever, conductor = data["train"]
    assert fever["input"] == ("Which factor will most likely cause a person to develop a fever?\n"
                              "A. a leg muscle relaxing after exercise\nB. a bacterial population in the bloodstream\n"
                              "C. several viral particles on the skin\nD. carbohydrates being digested in the stomach\n"
                              "Answer: ") and fever["target"] == "B"
    assert conductor["input"].endswith("A. a rubber band\nB. a copper wire\nC. a wooden stick\nAnswer: ")
    assert conductor["target"] == "B"                                      # options numbered 1-3 upstream


def test_fetch_svamp_and_mawps_pool_and_split_622(fake_hub, tmp_path):
    svamp = fetched("svamp", tmp_path)
    assert [len(svamp[s]) for s in A.SPLITS] == [2, 1, 1]                 # 4 problems pooled, 6:2:2
    cave = next(r for s in A.SPLITS for r in svamp[s] if "cave" in r["input"])
    assert cave == {"input": "If they are already at 659 feet and the cave is 762 feet deep. How much farther "
                             "until they reach the end of the cave? Answer: ", "target": "103.0"}
    mawps = fetched("mawps", tmp_path)
    everything = [r for s in A.SPLITS for r in mawps[s]]
    assert [len(mawps[s]) for s in A.SPLITS] == [3, 1, 1]
    assert {"input": "William has 2 bottle caps. He buys 41 more. How many bottle caps does William have in all? "
                     "Answer: ", "target": "43.0"} in everything
    assert sorted(r["target"] for r in everything) == ["12.0", "2.5", "20.0", "43.0", "5.0"]
    again = fetched("mawps", tmp_path / "again")
    assert again == mawps, "seed 42: the same split every time"


def test_fetch_asdiv_from_parquet_layout_and_from_xml(fake_hub, tmp_path):
    data = fetched("asdiv", tmp_path)
    everything = [r for s in A.SPLITS for r in data[s]]
    assert len(everything) == 4, "the ratio answer '2:3' is dropped"
    assert {"input": "Seven red apples and two green apples are in the basket. How many apples are in the basket? "
                     "Answer: ", "target": "9.0"} in everything
    assert "1000.0" in [r["target"] for r in everything]
    local = fetched("asdiv", tmp_path / "xml", [str(FIXTURES / "ASDiv.xml")])
    assert sorted(r["target"] for s in A.SPLITS for r in local[s]) == ["2.0", "9.0"]


def test_fetch_local_named_splits(tmp_path):
    data = fetched("gsm8k", tmp_path, [f"train={FIXTURES / 'gsm8k_train.jsonl'}",
                                       f"test={FIXTURES / 'gsm8k_test.jsonl'}"])
    assert [len(data[s]) for s in A.SPLITS] == [3, 1, 2]


def test_json_in_pandas_column_layout(tmp_path):
    rows = A.read_rows(FIXTURES / "svamp_train.json")
    columns = {k: {str(n): row[k] for n, row in enumerate(rows)} for k in rows[0]}   # DataFrame.to_json()
    (tmp_path / "train.json").write_text(json.dumps(columns))
    assert A.read_rows(tmp_path / "train.json") == rows


def test_parquet_needs_pyarrow_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(cli.InputError, match="pip install pyarrow"):
        A.read_rows(tmp_path / "train-00000-of-00001.parquet")


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is the optional extra for the hub's parquet files")
    import pyarrow.parquet as pq
    rows = A.read_rows(FIXTURES / "arc_easy_train.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    assert A.read_rows(tmp_path / "train-00000-of-00001.parquet") == rows


def test_cli_fetch_and_dry_run(tmp_path):
    run = [sys.executable, str(ROOT / "annotate.py")]
    fetch_run = subprocess.run(run + ["fetch", "svamp", "--source", str(FIXTURES / "svamp_train.json"), "--source",
                                     str(FIXTURES / "svamp_test.json"), "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
    assert fetch_run.returncode == 0, fetch_run.stderr
    dry = subprocess.run(run + ["annotate", "--task", "svamp", "--in", str(tmp_path / "svamp_train.jsonl"),
                                "--out", str(tmp_path / "svamp_train_annotated.jsonl"), "--model", "glm-4-air",
                                "--dry-run"], capture_output=True, text=True, timeout=60, env={
                                    k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"})
    assert dry.returncode == 0, dry.stderr
    assert "##Please output following sentence importance" in dry.stdout and "CNY" in dry.stdout
