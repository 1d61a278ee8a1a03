"""Discrete-event simulation of G gateways in front of R vLLM replicas under a chat workload (a
benchmark, not a test): what chat affinity, least-loaded and round-robin routing do to vLLM's
prefix-cache hit rate, to TTFT and to the spread of load over the replicas, and what one replica
failing mid-run does to them. Routing is the gateway's own code (server/engines/routing.py's
Router, one per gateway). What a Router knows of the load (`--load-signal`): `reported`, as the
gateway does by default, each replica's own waiting and running requests and KV-cache use, read
by each gateway every `--scrape-interval` seconds at its own phase (so up to that old) plus its
own requests sent since; `own`, as before the gateways read vLLM's /metrics, only its own
requests in flight.

    # the tables and chart of docs/scale.md
    uv run python bench/cluster_sim.py --out docs/scale-sim.json --chart docs/scale-sim.png
    # one configuration
    uv run python bench/cluster_sim.py --replicas 64 --policy affinity --duration 120 --seed 3
    # the load each Router sees: the replicas' reports against its own requests only
    uv run python bench/cluster_sim.py --policy affinity --load-signal reported,own --fail-at none

Workload: chats arrive as a Poisson process; a chat has 1-7 turns with an exponential think time
between an answer and the next question; its first turn carries an attachment of one of the
eight modalities with probability `--attachment-share`; every turn resends the whole chat so far
(as OpenAI clients do), so turn t's prompt is turn t-1's prompt plus its answer and a question.
The run starts in steady state: chats already under way at t=0 (as many as the arrival rate and
think time imply) send their next turn after an exponential think time, and nothing is counted
during the warm-up, while every replica's cache sees its chats once.

Gateways (HAProxy's leastconn in front): each has `--encoder-workers` encoders serving new
attachments first come first served; with the shared Redis cache (default) a follow-up turn never
runs the encoder again, without it (`--no-shared-cache`) it does unless the same gateway encoded
that attachment before.

vLLM replica: continuous batching at step level. Every step decodes one token for every running
sequence and prefills up to the token budget less those tokens from the FCFS waiting queue; a
step takes step_ms + per_seq_ms * running + prefill_row_ms * prefilled rows. A request's KV
blocks (prompt and answer) are reserved when it is admitted; the replica's prefix cache is an LRU
of the full prompt blocks of finished requests, evicted from a chat's last block first, and a new
request hits the longest run of its chat's blocks that the replica still holds (never the last
prompt row, which vLLM always computes). Answers' blocks are not reused: the next turn sends them
as prompt embeddings, which vLLM hashes apart from the token ids it generated.

Failure: at `--fail-at` one replica dies: requests in its queue (no token sent yet) are retried
once on another replica by their gateway, streams under way end with an error (the user sends the
turn again), and each gateway marks it down at its first failed request to it or its next health
probe, whichever comes first.
"""

import argparse
import dataclasses
import hashlib
import heapq
import json
import math
import random
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from server.engines.routing import POLICIES, ReplicaLoad, Router

# docs/benchmarks.md, "What a request costs": decode + encoder at batch 1, one torch thread,
# model_repo/tiny on this machine's CPU (ms). The only encoder figures measured; a GPU encoder
# of OneLLM-7B was never run (scale them with --encoder-scale).
ENCODER_MS = {"image": 1.8 + 63.6, "audio": 1.5 + 914.6, "video": 12.5 + 85.9, "point": 0.9 + 763.0,
              "rgbd": 2.4 + 62.8, "rgbn": 2.4 + 65.0, "fmri": 0.4 + 12.5, "imu": 0.3 + 99.6}
MODALITIES = tuple(ENCODER_MS)
PREFIX_ROWS = 30  # the UPM's prefix per attachment (docs/architecture.md)
TEMPLATE_ROWS = 6  # a message's role and separator tokens around its text
# docs/benchmarks.md, "Load", "Gateway overhead": 9.2 ms p50 of TTFT is the gateway's own
GATEWAY_MS = 9.2


@dataclass(frozen=True)
class Profile:
    """Service times of one vLLM replica."""

    step_ms: float  # one decode step with no sequence (weights read, scheduling)
    per_seq_ms: float  # each running sequence's share of a step
    prefill_row_ms: float  # each prompt row computed (a row found in the prefix cache costs nothing)
    wire_ms_per_row: float  # gateway sends and vLLM reads the prompt embeddings (every row, hit or not)
    block: int  # KV-cache block, tokens
    kv_blocks: int  # KV-cache capacity, blocks
    token_budget: int  # max_num_batched_tokens
    max_seqs: int  # max_num_seqs


PROFILES = {
    # OneLLM-7B in float16 on one 80 GB GPU: ASSUMED, never measured (no GPU was lent). A decode
    # step reads the 13.5 GB of weights (~7 ms at ~2 TB/s) and each sequence's KV; a prefilled row
    # is ~14 GFLOP (~0.08 ms at half of an A100's 312 TFLOP/s); ~50 GB of KV cache at 0.5 MiB a
    # token is ~6000 blocks of 16; 256 sequences is vLLM's default, a 2048-token step budget its
    # API server's default on smaller GPUs (8192 on 80 GB ones: a smaller budget here). The wire cost is
    # measured (docs/benchmarks.md, "Wire cost": [600, 4096] float16, 5.11 ms sent + 8.69 ms read).
    "gpu": Profile(step_ms=8.0, per_seq_ms=0.06, prefill_row_ms=0.08, wire_ms_per_row=13.8 / 600,
                   block=16, kv_blocks=6000, token_budget=2048, max_seqs=256),
    # model_repo/tiny on vLLM's CPU build, 2 cores (docs/benchmarks.md, "Load", vLLM direct):
    # 21.8 requests/s of 32 tokens at concurrency 1 with TTFT 9.2 ms -> 1.18 ms a step with one
    # sequence; 164.9 requests/s at 16 -> ~3.0 ms a step with 16: step 1.06 + 0.12 a sequence. The
    # split of TTFT into prefill rows is assumed (0.05 ms a row of ~115); wire from "Wire cost"
    # ([600, 128] float32, 0.38 + 0.58 ms); 1 GiB of KV cache (scripts/vllm-serve.sh) at 2 KiB a
    # token (2 layers x K and V x 128 x float32) in 32-token blocks.
    "cpu": Profile(step_ms=1.06, per_seq_ms=0.12, prefill_row_ms=0.05, wire_ms_per_row=0.96 / 600,
                   block=32, kv_blocks=16384, token_budget=2048, max_seqs=256),
}


@dataclass
class Turn:
    prompt: int  # rows sent, the whole chat so far
    answer: int  # tokens generated
    think: float  # seconds the user takes before this turn, after the previous answer


@dataclass(eq=False)  # one chat is one object: sets of chats hash by identity
class Chat:
    index: int
    affinity: str
    modality: str | None
    turns: list[Turn]
    next_turn: int = 0
    last_replica: str | None = None  # that sent the first token of its latest answer
    encoded_on: set = field(default_factory=set)  # gateways whose local cache holds the attachment


def make_chat(seed: int, index: int, attachment_share: float, think_mean: float) -> Chat:
    """The same chat for a seed and index whatever the policy or the order of events."""
    rng = random.Random(f"{seed}/{index}")
    modality = rng.choice(MODALITIES) if rng.random() < attachment_share else None
    rows = 1 + (PREFIX_ROWS if modality else 0)  # BOS and the attachment's prefix
    turns = []
    for _ in range(rng.randint(1, 7)):
        rows += rng.randint(8, 64) + TEMPLATE_ROWS  # the question
        answer = rng.randint(64, 640)
        turns.append(Turn(prompt=rows, answer=answer, think=rng.expovariate(1 / think_mean)))
        rows += answer + TEMPLATE_ROWS
    affinity = hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()
    return Chat(index, affinity, modality, turns)


@dataclass
class Request:
    chat: Chat
    turn: int
    sent: float  # when the user sent it
    gateway: "Gateway | None" = None
    attempts: list = field(default_factory=list)  # (time, replica name) of every dispatch
    hit_tokens: int = 0
    prefill_left: int = 0
    admitted: bool = False
    blocks: int = 0
    first_token: float | None = None
    served_by: str | None = None  # the replica that sent the first token
    moved: bool | None = None  # served elsewhere than the chat's previous turn (None: first seen)
    done: float | None = None
    status: str = "pending"  # ok | stream-error | unavailable

    @property
    def spec(self) -> Turn:
        return self.chat.turns[self.turn]


class Simulation:
    def __init__(self, args, policy: str, replicas: int):
        self.args = args
        self.load_signal = args.load_signal
        self.profile = PROFILES[args.profile]
        if args.kv_blocks:
            self.profile = dataclasses.replace(self.profile, kv_blocks=args.kv_blocks)
        self.policy = policy
        self.events: list = []
        self.sequence = 0
        self.now = 0.0
        names = [f"vllm-{i}" for i in range(replicas)]
        self.replicas = {name: Replica(self, name) for name in names}
        self.chat_rate, self.gateway_count = self._size(replicas)
        self.gateways = [Gateway(self, i, Router(names, policy, load_slack=args.load_slack,
                                                 load_epsilon=args.load_epsilon, seed=args.seed * 1000 + i))
                         for i in range(self.gateway_count)]
        self.requests: list[Request] = []
        self._lb_next = 0
        self.failed: str | None = None
        self.end = args.warmup + args.duration
        self._chats_seen: set[Chat] = set()
        self.displaced: set[Chat] = set()  # chats the failed replica served last

    # --- sizing ---------------------------------------------------------------------

    def _size(self, replicas: int) -> tuple[float, int]:
        """Chats per second that load the replicas to --util of what they serve at full batch
        (every prompt row computed), and enough gateways for their encoders to be half busy."""
        p, a = self.profile, self.args
        sample = [make_chat(a.seed + 1, i, a.attachment_share, a.think) for i in range(4000)]
        turns = [t for chat in sample for t in chat.turns]
        per_chat = len(turns) / len(sample)
        blocks = statistics.fmean(math.ceil((t.prompt + t.answer) / p.block) for t in turns)
        batch = min(p.max_seqs, p.kv_blocks / blocks)
        turn_ms = statistics.fmean(t.prompt * p.prefill_row_ms + t.answer * (p.step_ms / batch + p.per_seq_ms)
                                   for t in turns)
        capacity = 1000 / turn_ms  # turns per second per replica
        chat_rate = a.users / a.duration if a.users else a.util * replicas * capacity / per_chat
        encode_s = statistics.fmean(ENCODER_MS[c.modality] for c in sample if c.modality) / 1000 * a.encoder_scale
        encodes = chat_rate * sum(1 for c in sample if c.modality) / len(sample)
        gateways = a.gateways or max(1, math.ceil(encodes * encode_s / (0.5 * a.encoder_workers)))
        return chat_rate, gateways

    # --- event loop -----------------------------------------------------------------

    def at(self, when: float, action, *payload) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, action, payload))

    def run(self) -> dict:
        a = self.args
        self._start_chats()
        if a.fail_at is not None:
            self.at(a.fail_at, self._fail)
        if self.load_signal == "reported":
            phases = random.Random(f"{a.seed}/scrapes")
            for gateway in self.gateways:
                self.at(phases.uniform(0, a.scrape_interval), gateway.scrape)
        # after the end no new turn starts, and what is under way runs to its end
        while self.events:
            self.now, _, action, payload = heapq.heappop(self.events)
            action(*payload)
        return self.report()

    def _start_chats(self) -> None:
        """Chats already under way at t=0, then the Poisson arrivals of new chats. In steady
        state chat_rate * E[turns - 1] * think chats are thinking, a chat of n turns n - 1 times
        as likely as a one-turn chat, and (think times being exponential) each sends its next
        turn after an exponential time again."""
        a = self.args
        arrivals = random.Random(f"{a.seed}/arrivals")
        sample = [len(make_chat(a.seed + 1, i, a.attachment_share, a.think).turns) - 1 for i in range(1000)]
        thinking = round(self.chat_rate * statistics.fmean(sample) * a.think)
        index = 0
        while thinking > 0:
            chat = make_chat(a.seed, index, a.attachment_share, a.think)
            index += 1
            if arrivals.random() < (len(chat.turns) - 1) / 6:  # 6: the most gaps a chat has
                chat.next_turn = arrivals.randint(1, len(chat.turns) - 1)
                self.at(arrivals.expovariate(1 / a.think), self._turn, chat)
                thinking -= 1
        t = 0.0
        while True:
            t += arrivals.expovariate(self.chat_rate)
            if t >= self.end:
                break
            self.at(t, self._turn, make_chat(a.seed, index, a.attachment_share, a.think))
            index += 1

    # --- a user's turn --------------------------------------------------------------

    def _turn(self, chat: Chat) -> None:
        if self.now >= self.end:
            return
        request = Request(chat, chat.next_turn, self.now)
        self.requests.append(request)
        self._chats_seen.add(chat)
        gateway = self._balance()
        request.gateway = gateway
        gateway.in_flight += 1
        if chat.modality and (chat.next_turn == 0 or (self.args.no_shared_cache and gateway.index not in chat.encoded_on)):
            gateway.encode(request)
        else:
            self.at(self.now + GATEWAY_MS / 1000, gateway.dispatch, request, ())

    def _balance(self) -> "Gateway":
        """HAProxy's leastconn: fewest connections, ties in turn."""
        count = len(self.gateways)
        order = [self.gateways[(self._lb_next + i) % count] for i in range(count)]
        chosen = min(order, key=lambda g: g.in_flight)
        self._lb_next = (chosen.index + 1) % count
        return chosen

    def answered(self, request: Request) -> None:
        request.done = self.now
        request.status = "ok"
        request.gateway.in_flight -= 1
        chat = request.chat
        chat.next_turn += 1
        if chat.next_turn < len(chat.turns):
            self.at(self.now + chat.turns[chat.next_turn].think, self._turn, chat)

    def cut(self, request: Request, status: str) -> None:
        """The request ends without its answer; a user whose stream broke sends the turn again."""
        request.done = self.now
        request.status = status
        request.gateway.in_flight -= 1
        if status == "stream-error":
            self.at(self.now + self.args.resend_after, self._turn, request.chat)

    # --- failure --------------------------------------------------------------------

    def _fail(self) -> None:
        victim = self.replicas[self.args.fail_replica]
        self.failed = victim.name
        self.displaced = {chat for chat in self._chats_seen if chat.last_replica == victim.name}
        victim.fail()
        probes = random.Random(f"{self.args.seed}/probes")
        for gateway in self.gateways:
            self.at(self.now + probes.uniform(0, self.args.probe_interval), gateway.probe)

    # --- results --------------------------------------------------------------------

    def report(self) -> dict:
        a = self.args
        start, end = a.warmup, self.end
        windows = {"steady": self._window(start, a.fail_at if a.fail_at is not None else end)}
        if a.fail_at is not None:
            windows["after failure"] = self._window(a.fail_at, end)
            windows["displaced chats"] = self._window(a.fail_at, end, lambda r: r.chat in self.displaced)
            # their turns after the first one the failure moved: back on one replica's cache?
            first_moved = {}
            for r in self.requests:
                if r.chat in self.displaced and r.sent >= a.fail_at:
                    first_moved.setdefault(r.chat, r)
            windows["displaced chats, later turns"] = self._window(
                a.fail_at, end, lambda r: r.chat in self.displaced and first_moved[r.chat] is not r)
        dispatched = [when for r in self.requests for when, name in r.attempts if name == self.failed]
        counted = [r for r in self.requests if start <= r.sent < end]
        result = {
            "policy": self.policy, "load_signal": self.load_signal, "replicas": len(self.replicas),
            "gateways": len(self.gateways),
            "profile": a.profile, "seed": a.seed, "chats_per_s": round(self.chat_rate, 3),
            "chats": len({r.chat.index for r in counted}), "requests": len(counted),
            "unfinished": sum(1 for r in counted if r.done is None),
            "stream_errors": sum(1 for r in counted if r.status == "stream-error"),
            "unavailable": sum(1 for r in counted if r.status == "unavailable"),
            "retried": sum(1 for r in counted if len(r.attempts) > 1),
            "failed_replica": self.failed,
            "displaced_chats": len(self.displaced),
            # refused, then retried elsewhere, until the gateway learns of the failure
            "sent_to_failed_after_failing": sum(1 for when in dispatched if when >= (a.fail_at or end)),
            "windows": windows,
        }
        loads = [r.in_flight_area / a.duration for r in self.replicas.values() if r.name != self.failed]
        result["in_flight_mean"] = round(statistics.fmean(loads), 2)
        result["kv_reserved_share"] = round(statistics.fmean(
            r.reserved_area / a.duration for r in self.replicas.values() if r.name != self.failed) / self.profile.kv_blocks, 3)
        result["in_flight_max_over_mean"] = round(max(loads) / statistics.fmean(loads), 3) if any(loads) else None
        return result

    def _window(self, lo: float, hi: float, keep=lambda request: True) -> dict:
        served = [r for r in self.requests if lo <= r.sent < hi and r.first_token is not None and keep(r)]
        follow = [r for r in served if r.turn > 0]
        ttft = sorted((r.first_token - r.sent) * 1000 for r in served)
        follow_ttft = sorted((r.first_token - r.sent) * 1000 for r in follow)

        block = self.profile.block
        prompts = max(1, sum(r.spec.prompt for r in follow))

        def rate(rows):
            return round(sum(r.hit_tokens for r in rows) / max(1, sum(r.spec.prompt for r in rows)), 4)

        # what a follow-up could hit at best: every full block of the turn before it
        reusable = sum((r.chat.turns[r.turn - 1].prompt + (r.chat.turns[r.turn - 1].answer if self.args.reuse_answers else 0))
                       // block * block for r in follow)
        tracked = [r.moved for r in follow if r.moved is not None]
        return {"requests": len(served), "hit_rate": rate(served), "follow_up_hit_rate": rate(follow),
                "follow_up_hit_ceiling": round(reusable / prompts, 4),
                "follow_up_moved": round(sum(tracked) / max(1, len(tracked)), 4),
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
                "ttft_p99_ms": percentile(ttft, 99), "follow_up_ttft_p50_ms": percentile(follow_ttft, 50),
                "follow_up_ttft_p95_ms": percentile(follow_ttft, 95),
                "follow_up_ttft_p99_ms": percentile(follow_ttft, 99)}


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)


class Gateway:
    def __init__(self, sim: Simulation, index: int, router: Router):
        self.sim, self.index, self.router = sim, index, router
        self.in_flight = 0
        self.encoder_queue: deque[Request] = deque()
        self.encoders_busy = 0

    def encode(self, request: Request) -> None:
        self.encoder_queue.append(request)
        self._next_encode()

    def _next_encode(self) -> None:
        sim = self.sim
        while self.encoders_busy < sim.args.encoder_workers and self.encoder_queue:
            request = self.encoder_queue.popleft()
            self.encoders_busy += 1
            seconds = ENCODER_MS[request.chat.modality] / 1000 * sim.args.encoder_scale
            sim.at(sim.now + seconds, self._encoded, request)

    def _encoded(self, request: Request) -> None:
        self.encoders_busy -= 1
        request.chat.encoded_on.add(self.index)
        self.sim.at(self.sim.now + GATEWAY_MS / 1000, self.dispatch, request, ())
        self._next_encode()

    def dispatch(self, request: Request, exclude: tuple) -> None:
        sim = self.sim
        name = self.router.pick(request.chat.affinity, exclude=exclude)
        if name is None:
            sim.cut(request, "unavailable")
            return
        self.router.started(name)
        request.attempts.append((sim.now, name))
        sim.at(sim.now + request.spec.prompt * sim.profile.wire_ms_per_row / 1000, sim.replicas[name].arrive, request)

    def refused(self, request: Request, name: str) -> None:
        """The replica failed before the first token: retry once elsewhere."""
        self.router.finished(name)
        self.router.mark_down(name)
        if len(request.attempts) > 1:
            self.sim.cut(request, "unavailable")
        else:
            self.dispatch(request, (name,))

    def stream_broke(self, request: Request, name: str) -> None:
        self.router.finished(name)
        self.router.mark_down(name)
        self.sim.cut(request, "stream-error")

    def finished(self, request: Request, name: str) -> None:
        self.router.finished(name)
        self.sim.answered(request)

    def probe(self) -> None:
        for name, replica in self.sim.replicas.items():
            if not replica.up:
                self.router.mark_down(name)

    def scrape(self) -> None:
        """Every replica's /metrics as it is now, taken in by the Router until the next read; a
        dead replica's read fails and its last report stands (the probe takes it out)."""
        sim = self.sim
        if sim.now >= sim.end:
            return
        for name, replica in sim.replicas.items():
            if replica.up:
                self.router.report(name, replica.load())
        sim.at(sim.now + sim.args.scrape_interval, self.scrape)


class Replica:
    def __init__(self, sim: Simulation, name: str):
        self.sim, self.name = sim, name
        self.up = True
        self.waiting: deque[Request] = deque()  # FCFS, prefill not finished
        self.running: list = []  # heap of (step the last token comes out, sequence, request)
        self.step = 0  # steps done since the start
        self.segment = None  # (start, step seconds, steps, prefill chunk) of the steps under way
        self.version = 0  # bumped to drop a scheduled segment end
        self.cache: OrderedDict[int, int] = OrderedDict()  # chat -> its leading blocks held, LRU first
        self.cached_blocks = 0
        self.reserved_blocks = 0  # of admitted requests
        self.in_flight_area = 0.0  # integral of requests in flight over the counted time
        self.reserved_area = 0.0  # and of KV blocks reserved
        self._area_since = 0.0
        self._load: tuple[float, ReplicaLoad | None] = (-1.0, None)  # (when, what it reported)

    # --- accounting -----------------------------------------------------------------

    def _account(self) -> None:
        sim = self.sim
        lo, hi = sim.args.warmup, sim.args.warmup + sim.args.duration
        span = max(0.0, min(sim.now, hi) - max(self._area_since, lo))
        self.in_flight_area += span * (len(self.waiting) + len(self.running))
        self.reserved_area += span * self.reserved_blocks
        self._area_since = sim.now

    def load(self) -> ReplicaLoad:
        """What its /metrics would say now: a request waits until the scheduler admits it (vLLM's
        num_requests_waiting), admitted ones run, prefilling or decoding; KV use is of blocks
        reserved by admitted requests (cached blocks of finished ones are free to evict)."""
        if self._load[0] != self.sim.now:
            waiting = sum(1 for request in self.waiting if not request.admitted)
            running = len(self.running) + len(self.waiting) - waiting
            self._load = (self.sim.now, ReplicaLoad(waiting, running, self.reserved_blocks / self.sim.profile.kv_blocks))
        return self._load[1]

    # --- requests -------------------------------------------------------------------

    def arrive(self, request: Request) -> None:
        sim = self.sim
        if not self.up:  # connection refused: the gateway knows within a millisecond
            sim.at(sim.now + 0.001, request.gateway.refused, request, self.name)
            return
        self._account()
        request.admitted = False
        request.prefill_left = request.spec.prompt
        self.waiting.append(request)
        if self.segment is None:
            self._plan()
        else:
            self._cut_short()

    def _cut_short(self) -> None:
        """A decode run of several steps ends after the step under way, so that the new request
        joins the next one."""
        start, seconds, steps, chunk = self.segment
        done = int((self.sim.now - start) / seconds) + 1
        if chunk or done >= steps:
            return
        self.version += 1
        self.segment = (start, seconds, done, chunk)
        self.sim.at(start + done * seconds, self._segment_end, self.version)

    def _admit(self, request: Request, active: int) -> bool:
        p = self.sim.profile
        if active >= p.max_seqs:
            return False
        need = math.ceil((request.spec.prompt + request.spec.answer) / p.block)
        if need > p.kv_blocks - self.reserved_blocks:
            return False
        held = self.cache.pop(request.chat.index, 0)
        self.cached_blocks -= held
        hit = min(held, (request.spec.prompt - 1) // p.block)
        request.hit_tokens = hit * p.block
        request.prefill_left = request.spec.prompt - request.hit_tokens
        request.blocks = need
        request.admitted = True
        self.reserved_blocks += need
        self._evict(p.kv_blocks - self.reserved_blocks)
        return True

    def _evict(self, room: int) -> None:
        """Least recently used chats lose their last blocks first, as vLLM frees a sequence's
        blocks tail first."""
        while self.cached_blocks > room:
            chat, held = next(iter(self.cache.items()))
            drop = min(held, self.cached_blocks - room)
            self.cached_blocks -= drop
            if held == drop:
                del self.cache[chat]
            else:
                self.cache[chat] = held - drop  # keeps its place at the cold end

    def _plan(self) -> None:
        sim, p = self.sim, self.sim.profile
        chunk, budget, active = [], p.token_budget - len(self.running), len(self.running)
        for request in self.waiting:
            if budget <= 0:
                break
            if not request.admitted and not self._admit(request, active):
                break
            active += 1
            rows = min(budget, request.prefill_left)
            chunk.append((request, rows))
            budget -= rows
        if chunk:
            seconds = (p.step_ms + p.per_seq_ms * len(self.running) + p.prefill_row_ms * sum(r for _, r in chunk)) / 1000
            steps = 1
        elif self.running:
            seconds = (p.step_ms + p.per_seq_ms * len(self.running)) / 1000
            steps = self.running[0][0] - self.step
        else:
            self.segment = None
            return
        self.version += 1
        self.segment = (sim.now, seconds, steps, chunk)
        sim.at(sim.now + seconds * steps, self._segment_end, self.version)

    def _segment_end(self, version: int) -> None:
        if version != self.version:
            return
        sim = self.sim
        self._account()
        _, _, steps, chunk = self.segment
        self.step += steps
        while self.running and self.running[0][0] <= self.step:
            _, _, request = heapq.heappop(self.running)
            self._release(request)
            request.gateway.finished(request, self.name)
        for request, rows in chunk:
            request.prefill_left -= rows
            if request.prefill_left:
                continue
            self.waiting.remove(request)
            request.first_token = sim.now
            request.served_by = self.name
            chat = request.chat
            request.moved = None if chat.last_replica is None else chat.last_replica != self.name
            chat.last_replica = self.name
            if request.spec.answer > 1:
                heapq.heappush(self.running, (self.step + request.spec.answer - 1, sim.sequence, request))
                sim.sequence += 1
            else:
                self._release(request)
                request.gateway.finished(request, self.name)
        self._plan()

    def _release(self, request: Request) -> None:
        """The request's prompt blocks stay cached, most recently used."""
        self.reserved_blocks -= request.blocks
        kept = request.spec.prompt + (request.spec.answer if self.sim.args.reuse_answers else 0)
        full = kept // self.sim.profile.block
        self.cache[request.chat.index] = full
        self.cached_blocks += full
        self._evict(self.sim.profile.kv_blocks - self.reserved_blocks)

    def fail(self) -> None:
        self._account()
        self.up = False
        self.version += 1
        self.segment = None
        for request in list(self.waiting):  # nothing streamed yet: the gateway retries it
            request.gateway.refused(request, self.name)
        for _, _, request in self.running:
            request.gateway.stream_broke(request, self.name)
        self.waiting.clear()
        self.running.clear()
        self.cache.clear()
        self.cached_blocks = self.reserved_blocks = 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="8,64,512", help="comma-separated replica counts")
    parser.add_argument("--policy", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--users", type=int, default=None,
                        help="new chats over the counted time (default: as many as load the replicas to --util)")
    parser.add_argument("--duration", default=None,
                        help="counted seconds, one per replica count or one for all (default: 120 s up to 8 "
                             "replicas, 60 s up to 64, 20 s beyond, where routing 512 ways takes most of the run time)")
    parser.add_argument("--warmup", type=float, default=25.0,
                        help="seconds simulated before counting (long enough for every chat under way to send a turn)")
    parser.add_argument("--util", type=float, default=0.7, help="offered load, share of a replica's full-batch throughput")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    parser.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks per replica (default: the profile's)")
    parser.add_argument("--gateways", type=int, default=None, help="default: enough for encoders half busy")
    parser.add_argument("--encoder-workers", type=int, default=2, help="encoders per gateway (2 cores here)")
    parser.add_argument("--encoder-scale", type=float, default=1.0, help="factor on the measured CPU encoder times")
    parser.add_argument("--no-shared-cache", action="store_true", help="no Redis: a follow-up on another gateway re-encodes")
    parser.add_argument("--reuse-answers", action="store_true",
                        help="answers' blocks hit on the next turn too (text sent as token ids, not embeddings)")
    parser.add_argument("--attachment-share", type=float, default=0.7, help="chats whose first turn has an attachment")
    parser.add_argument("--think", type=float, default=10.0, help="mean think time between turns, seconds")
    parser.add_argument("--resend-after", type=float, default=2.0, help="seconds before a user resends a broken turn")
    parser.add_argument("--fail-at", default="0.5",
                        help="when a replica dies: share of the counted time (<1), seconds, or 'none'")
    parser.add_argument("--fail-replica", default="vllm-0")
    parser.add_argument("--probe-interval", type=float, default=2.0,
                        help="gateways' health probes, seconds (server/engines/replicas.py's default)")
    parser.add_argument("--load-slack", type=int, default=2, help="Router load_slack")
    parser.add_argument("--load-epsilon", type=float, default=0.25, help="Router load_epsilon")
    parser.add_argument("--load-signal", default="reported",
                        help="comma-separated, of reported (each replica's /metrics, as the gateway reads "
                             "them) and own (each gateway's own requests in flight only)")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between a gateway's reads of the replicas' /metrics (the gateway's default)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--chart", default=None, help="write a PNG chart here")
    return parser.parse_args(argv)


def configurations(args):
    """(policy, replicas, argument namespace) of every run asked for."""
    sizes = [int(r) for r in args.replicas.split(",")]
    if args.duration is None:
        durations = [120.0 if size <= 8 else 60.0 if size <= 64 else 20.0 for size in sizes]
    else:
        durations = [float(d) for d in args.duration.split(",")]
        durations *= len(sizes) if len(durations) == 1 else 1
        if len(durations) != len(sizes):
            raise SystemExit("--duration takes one value or one per replica count")
    signals = args.load_signal.split(",")
    if not set(signals) <= {"reported", "own"}:
        raise SystemExit(f"--load-signal: {args.load_signal!r} is not of reported, own")
    for size, duration in zip(sizes, durations):
        for policy, signal in ((policy, signal) for policy in args.policy.split(",") for signal in signals):
            if policy not in POLICIES:
                raise SystemExit(f"--policy: {policy!r} is not one of {', '.join(POLICIES)}")
            run = argparse.Namespace(**vars(args))
            run.duration = duration
            if args.fail_at == "none":
                run.fail_at = None
            else:
                value = float(args.fail_at)
                run.fail_at = args.warmup + (value * duration if value < 1 else value)
            run.load_signal = signal
            yield policy, size, run


def simulate(policy: str, replicas: int, args) -> dict:
    started = time.perf_counter()
    result = Simulation(args, policy, replicas).run()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def routing(result: dict) -> str:
    return f"{result['policy']}, {result['load_signal']} load"


def table(results: list[dict]) -> str:
    """Markdown: steady state, then the replica failure."""
    lines = ["| replicas | gateways | routing | requests | follow-up hit rate (ceiling) | follow-ups moved "
             "| follow-up TTFT p50 / p95 / p99 (ms) | all turns TTFT p50 / p95 / p99 (ms) "
             "| in flight per replica: mean, max/mean | KV reserved |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        w = r["windows"]["steady"]
        lines.append(f"| {r['replicas']} | {r['gateways']} | {routing(r)} | {r['requests']} "
                     f"| {w['follow_up_hit_rate']:.1%} ({w['follow_up_hit_ceiling']:.1%}) | {w['follow_up_moved']:.1%} "
                     f"| {w['follow_up_ttft_p50_ms']} / {w['follow_up_ttft_p95_ms']} / {w['follow_up_ttft_p99_ms']} "
                     f"| {w['ttft_p50_ms']} / {w['ttft_p95_ms']} / {w['ttft_p99_ms']} "
                     f"| {r['in_flight_mean']}, {r['in_flight_max_over_mean']} | {r['kv_reserved_share']:.0%} |")
    failed = [r for r in results if "displaced chats" in r["windows"]]
    if failed:
        lines += ["", "| replicas | routing | chats on the failed replica | their hit rate after: all turns, from the 2nd on | "
                  "their TTFT p50 / p99 after (ms) | everyone's follow-up hit rate before / after | streams cut "
                  "| requests it refused (retried) | no replica left |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in failed:
            moved, later, before, after = (r["windows"][k] for k in (
                "displaced chats", "displaced chats, later turns", "steady", "after failure"))
            lines.append(f"| {r['replicas']} | {routing(r)} | {r['displaced_chats']} "
                         f"| {moved['follow_up_hit_rate']:.1%}, {later['follow_up_hit_rate']:.1%} "
                         f"| {moved['ttft_p50_ms']} / {moved['ttft_p99_ms']} "
                         f"| {before['follow_up_hit_rate']:.1%} / {after['follow_up_hit_rate']:.1%} | {r['stream_errors']} "
                         f"| {r['sent_to_failed_after_failing']} | {r['unavailable']} |")
    return "\n".join(lines)


def chart(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["replicas"] for r in results})
    policies = list(dict.fromkeys(routing(r) for r in results))
    panels = [
        ("follow-up prefix-cache hit rate (%)", lambda r: 100 * r["windows"]["steady"]["follow_up_hit_rate"], None),
        ("follow-up TTFT p99 (bars), p50 (dots), ms, log", lambda r: r["windows"]["steady"]["follow_up_ttft_p99_ms"],
         lambda r: r["windows"]["steady"]["follow_up_ttft_p50_ms"]),
        ("in flight per replica, max / mean", lambda r: r["in_flight_max_over_mean"], None),
        ("after a replica fails: its chats' hit rate\nfrom their 2nd turn after (%)",
         lambda r: 100 * r["windows"]["displaced chats, later turns"]["follow_up_hit_rate"]
         if "displaced chats" in r["windows"] else 0, None),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(18, 4))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        rows = {r["replicas"]: r for r in results if routing(r) == policy}
        xs = [k + i * width for k, size in enumerate(sizes) if size in rows]
        runs = [rows[size] for size in sizes if size in rows]
        for axis, (_, bar, dot) in zip(axes, panels):
            axis.bar(xs, [bar(r) or 0 for r in runs], width, label=policy)
            if dot:
                axis.scatter(xs, [dot(r) or 0 for r in runs], color="black", s=12, zorder=3)
    for axis, (title, _, _) in zip(axes, panels):
        axis.set_title(title, fontsize=10)
        axis.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))], [f"{s} replicas" for s in sizes])
    axes[1].set_yscale("log")
    axes[2].legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    args = parse_args()
    results = []
    for policy, replicas, run in configurations(args):
        results.append(simulate(policy, replicas, run))
        r = results[-1]
        print(f"{replicas:>4} replicas {routing(r):<28} {r['requests']:>7} requests "
              f"hit {r['windows']['steady']['follow_up_hit_rate']:.1%} in {r['wall_s']} s", flush=True)
    print()
    print(table(results))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)
    if args.chart:
        chart(results, args.chart)


if __name__ == "__main__":
    main()
