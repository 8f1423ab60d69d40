"""A fake OpenAI-compatible chat server on 127.0.0.1 that injects faults on demand, for tests and the benchmark.

``POST /v1/chat/completions`` answers with questions that are a function of the chunk alone (the text between the
prompt's triple quotes, else the whole prompt), in one of five shapes a parser must handle: a dict of ``question_k``,
a list, ``{"questions": [...]}``, JSON in a code fence, JSON inside prose. Faults come from a queue (``push``) first,
then at ``fault_rate`` from a seeded function of (chunk, attempt), so the same run meets the same faults again:

    500        HTTP 500
    429        HTTP 429 with Retry-After
    slow       the answer comes after ``slow_seconds`` (longer than the client's timeout)
    malformed  the answer's JSON cut in half
    empty      an empty answer
    few        half the questions asked for
    drop       the connection closed without a response
    401        HTTP 401, a bad key (never drawn at random: only ``push`` serves it)

For `adapter rag` it is also a reader and a judge. Given ``rag_gold`` (question text -> its gold chunk's text), an
answer prompt (numbered passages, then the question) is answered by quoting the gold passage when it is among the
passages, else the first passage: so the answer is right exactly when retrieval put the gold chunk in the context. A
grade prompt is graded by how many of the answer's words the reference passage holds (correct, partly, wrong), in
JSON of one of three shapes. On these prompts ``malformed`` cuts a grade's JSON in half and ``few`` gives a grade in
prose without JSON (an answer comes back empty under either), so every fault is one a client must ask again for.

Serve by hand: ``python tests/fake_llm.py --port 8000 --fault-rate 0.2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "429", "slow", "malformed", "empty", "few", "drop")
TEMPLATES = (
    "What does it say about {a} and {b}?",
    "how is {a} related to {b}",
    "Can you explain the {a} part, especially the {b}?",
    "why would {a} matter for {b}??",
    "Is there any info on {a} when it comes to {b}?",
    "{a} vs {b} - what's the difference",
    "What happens to the {b} if the {a} changes?",
    "quick question: {a} {b}?",
    "How do I find out about {a} regarding {b}?",
    "whats the deal with {a} and {b}",
    "Which {b} depends on the {a}?",
    "Tell me how the {a} affects {b}.",
)


def chunk_of(prompt: str) -> str:
    """The chunk inside a prompt: the text between the first and last triple quotes, else the whole prompt."""
    parts = prompt.split('"""')
    return '"""'.join(parts[1:-1]).strip() if len(parts) >= 3 else prompt


def questions_for(chunk: str, n: int, *, near_duplicates: bool = False) -> list[str]:
    """``n`` distinct questions made of the chunk's own words, the same every time for the same chunk.

    With ``near_duplicates``, one chunk in four gets its first question again as its last, lower-cased and with its
    question mark dropped (or added): a near-duplicate an encoder should catch but an exact match would not.
    """
    rng = random.Random(hashlib.sha256(chunk.encode()).hexdigest())
    words = list(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z]{4,}", chunk))) or ["thing", "stuff"]
    words = words if len(words) > 1 else [*words, "stuff"]
    out: list[str] = []
    while len(out) < n:
        a, b = rng.sample(words, 2)
        q = rng.choice(TEMPLATES).format(a=a, b=b)
        if q not in out:
            out.append(q)
        if len(out) == len(TEMPLATES) * len(words) * (len(words) - 1):
            break
    if near_duplicates and n > 1 and rng.random() < 0.25:
        first = out[0].lower()
        out[-1] = first.rstrip("?") if first.endswith("?") else first + "?"
    return out


def render(questions: list[str], shape: int) -> str:
    """Questions as an LLM might write them, in shape 0-4."""
    numbered = {f"question_{k}": q for k, q in enumerate(questions, 1)}
    if shape == 0:
        return json.dumps(numbered, indent=2)
    if shape == 1:
        return json.dumps(questions)
    if shape == 2:
        return json.dumps({"questions": questions})
    if shape == 3:
        return f"```json\n{json.dumps(numbered, indent=2)}\n```"
    return f"Sure! Here are the questions:\n\n{json.dumps({'questions': questions})}\n\nWant more?"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]{3,}", text.lower())


def rag_reply(prompt: str, gold: dict[str, str], shape: int) -> str | None:
    """The reader's answer or the judge's grade for a rag prompt; None when the prompt is not one."""
    if "Reference passage:" in prompt:  # the judge
        reference = re.search(r"Reference passage:\s*<<<\s*(.*?)\s*>>>", prompt, re.S)
        answer = re.search(r"Answer to grade:\s*<<<\s*(.*?)\s*>>>", prompt, re.S)
        said = _words(answer.group(1) if answer else "")
        known = set(_words(reference.group(1) if reference else ""))
        share = sum(w in known for w in said) / len(said) if said else 0.0
        grade = "correct" if share >= 0.9 else "partly" if share >= 0.5 else "wrong"
        body = {"grade": grade, "reason": f"{share:.0%} of the answer's words are in the reference"}
        return [json.dumps(body), f"```json\n{json.dumps(body)}\n```", f"Here is my grade: {json.dumps(body)}"][shape]
    if "Passages:" in prompt and "Question:" in prompt:  # the reader
        passages = re.findall(r"^\[\d+\] (.*)$", prompt, re.M)
        question = prompt.rsplit("Question:", 1)[1].strip()
        target = " ".join(gold.get(question, "").split())
        chosen = next((p for p in passages if target and p == target), passages[0] if passages else "")
        return " ".join(chosen.split()[:12]) if chosen else "I do not know."
    return None


@dataclass
class Request:
    """One request the server saw."""

    key: str  # hash of the chunk
    attempt: int  # 0 for the chunk's first request
    fault: str | None
    start: float  # time.monotonic()
    end: float
    auth: str
    model: str
    temperature: float | None


class FakeLLM:
    """The server; use as a context manager. ``url`` is the base URL to give the client."""

    def __init__(self, *, questions: int = 20, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 seed: int = 0, delay: float = 0.0, slow_seconds: float = 2.0, retry_after: str = "1",
                 near_duplicates: bool = False, max_faults: int | None = None, port: int = 0,
                 rag_gold: dict[str, str] | None = None, hold_after: int | None = None):
        self.questions, self.fault_rate, self.faults, self.seed = questions, fault_rate, faults, seed
        self.delay, self.slow_seconds, self.retry_after = delay, slow_seconds, retry_after
        self.near_duplicates = near_duplicates
        self.rag_gold = rag_gold or {}  # question text -> gold chunk text, for rag prompts
        self.max_faults = max_faults  # random faults strike only a chunk's first this many attempts (None: any)
        self.requests: list[Request] = []
        self.inflight = self.max_inflight = 0
        # requests after the first ``hold_after`` wait unanswered until ``release()``: a client killed while they
        # wait is killed mid-run, however slow the machine (``held`` counts the requests waiting)
        self.hold_after, self.held, self._begun, self._released = hold_after, 0, 0, threading.Event()
        self._queue: deque[str | None] = deque()
        self._attempts: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()  # counted when served, before a slow answer ends
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def push(self, *faults: str | None) -> None:
        """Serve these faults (None: a good answer) to the next requests, in order, before any random ones."""
        with self._lock:
            self._queue.extend(faults)

    def answer(self, chunk: str) -> list[str]:
        """The questions the server gives for a chunk when no fault strikes."""
        return questions_for(chunk, self.questions, near_duplicates=self.near_duplicates)

    def release(self) -> None:
        """Answer the held requests and every later one."""
        self._released.set()

    def faults_seen(self) -> Counter[str]:
        """How many times each fault has been served so far."""
        with self._lock:
            return Counter(self._faults)

    def _begin(self, key: str) -> tuple[int, str | None, bool]:
        """(attempt number for ``key``, the fault to serve, whether to hold the request)."""
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
            self._begun += 1
            hold = self.hold_after is not None and self._begun > self.hold_after and not self._released.is_set()
            self.held += hold
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self._queue:
                fault = self._queue.popleft()
            else:
                rng = random.Random(f"{self.seed}:{key}:{attempt}")
                strikes = rng.random() < self.fault_rate and (self.max_faults is None or attempt < self.max_faults)
                fault = rng.choice(self.faults) if strikes else None
            if fault:
                self._faults[fault] += 1
            return attempt, fault, hold

    def _end(self, request: Request) -> None:
        with self._lock:
            self.inflight -= 1
            self.requests.append(request)


def _handler(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes; without this each waits ~40 ms

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 -- the http.server hook's name
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
            chunk = chunk_of(prompt)
            key = hashlib.sha256(chunk.encode()).hexdigest()[:16]
            start = time.monotonic()
            attempt, fault, hold = fake._begin(key)
            if hold:
                fake._released.wait()
            try:
                self._reply(body, chunk, key, fault)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) first
                pass
            finally:
                fake._end(Request(key, attempt, fault, start, time.monotonic(), self.headers.get("Authorization", ""),
                                  body.get("model", ""), body.get("temperature")))

        def _reply(self, body: dict, chunk: str, key: str, fault: str | None) -> None:
            time.sleep(fake.slow_seconds if fault == "slow" else fake.delay)
            if fault == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if fault == "500":
                self._send(500, {"error": {"message": "internal server error", "type": "server_error"}})
                return
            if fault == "401":
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                return
            if fault == "429":
                self._send(429, {"error": {"message": "rate limit reached", "type": "requests"}},
                           {"Retry-After": fake.retry_after})
                return
            prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
            content = rag_reply(prompt, fake.rag_gold, int(key, 16) % 3)
            if content is not None:  # a rag prompt: faults shaped for answers and grades
                grading = "Reference passage:" in prompt
                if fault == "malformed":
                    content = content[: len(content) // 2] if grading else ""
                elif fault == "few":
                    content = "The answer looks about right to me." if grading else ""
                elif fault == "empty":
                    content = ""
                self._send(200, {"id": f"fake-{key}", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", "fake"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})
                return
            questions = fake.answer(chunk)
            shape = int(key, 16) % 5
            content = render(questions, shape)
            if fault == "malformed":
                content = content[: len(content) // 2]
            elif fault == "empty":
                content = ""
            elif fault == "few":
                content = render(questions[: len(questions) // 2], shape)
            self._send(200, {"id": f"fake-{key}", "object": "chat.completion", "created": 0,
                             "model": body.get("model", "fake"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}]})

    return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    args = parser.parse_args()
    fake = FakeLLM(questions=args.questions, fault_rate=args.fault_rate, seed=args.seed,
                   slow_seconds=args.slow_seconds, port=args.port)
    with fake:
        print(f"serving {fake.url}", flush=True)  # noqa: T201
        fake._thread.join()
