"""How long things take that the tests only check happen (a benchmark): the tests keep the
behaviour with generous deadlines, the figures are measured here, one command each.

    uv run python bench/timings.py make-tiny     # seconds for `onellm make-tiny`
    uv run python bench/timings.py fuzz          # each decoder's slowest and median fuzzed example
    uv run python bench/timings.py trickle       # a small image chat, idle and with 60 uploads trickling in
    uv run python bench/timings.py hang-up       # 3 clients hanging up mid-answer, then one served (2 slots)
    uv run python bench/timings.py leave-queue   # from a queued client hanging up to the queue being empty

The gateways are started as the hardening tier starts them (tests/gateway_process.py), on
`--model` (model_repo/tiny), with the tier's settings for the figure measured.
"""

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "hardening")]
from gateway_process import GatewayProcess, flags  # noqa: E402
from gateways import SLOW_CLIENTS  # noqa: E402
from test_overload import ADMISSION, metric  # noqa: E402
from test_slow_clients import TRICKLE_CLIENTS, Tricklers, normal_request  # noqa: E402


def gateway(model: Path, workdir: str, settings: dict) -> GatewayProcess:
    return GatewayProcess(model, Path(tempfile.mkdtemp(dir=workdir)), flags(settings)).start()


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway never got there")
        time.sleep(0.01)


def make_tiny(args) -> None:
    from server.cli import main
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        assert main(["make-tiny", "--out", f"{folder}/tiny"]) == 0
        print(f"make-tiny: {time.perf_counter() - started:.1f} s")


def fuzz(args) -> None:
    from hypothesis import HealthCheck, given, settings
    from test_fuzz_decoders import DECODERS, EXAMPLES, damaged
    from server.errors import InputError

    print("| decoder | examples | median (ms) | slowest (ms) |\n|---|---:|---:|---:|")
    for name, (family, call, _) in DECODERS.items():
        seconds = []

        @given(data=damaged(family))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        def timed(data: bytes):
            started = time.perf_counter()
            try:
                call(data)
            except InputError:
                pass
            seconds.append(time.perf_counter() - started)

        timed()
        print(f"| {name} | {len(seconds)} | {1000 * statistics.median(seconds):.1f} | {1000 * max(seconds):.1f} |")


def trickle(args) -> None:
    server = gateway(args.model, args.workdir, SLOW_CLIENTS)
    try:
        normal_request(server.url)  # warm: the first image request loads what the later ones reuse
        idle = [normal_request(server.url) for _ in range(args.rounds)]
        tricklers = Tricklers(server.port, [f"127.0.0.{10 + i}" for i in range(TRICKLE_CLIENTS)])
        try:
            wait_for(lambda: metric(server.url, "onellm_uploads_in_progress") >= TRICKLE_CLIENTS)
            loaded = [normal_request(server.url) for _ in range(args.rounds)]
        finally:
            tricklers.close()
        wait_for(lambda: metric(server.url, "onellm_uploads_in_progress") == 0)
        idle += [normal_request(server.url) for _ in range(args.rounds)]  # before and after: a loaded machine drifts
    finally:
        server.stop()
    print(f"small image chat, median of {len(idle)} idle: {statistics.median(idle):.3f} s; median of "
          f"{len(loaded)} with {TRICKLE_CLIENTS} uploads trickling: {statistics.median(loaded):.3f} s "
          f"({statistics.median(loaded) / statistics.median(idle):.2f}x)")


def hang_up(args) -> None:
    server = gateway(args.model, args.workdir, ADMISSION)
    try:
        started = time.monotonic()
        for _ in range(ADMISSION["max_concurrent"] + 1):
            with httpx.stream("POST", f"{server.url}/v1/chat", data={"prompt": "Go on.", "max_tokens": "2000"},
                              timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                        break
        answered = httpx.post(f"{server.url}/v1/chat", timeout=120,
                              data={"prompt": "Still there?", "max_tokens": "5", "stream": "false"})
        assert answered.status_code == 200, answered.text
        print(f"{ADMISSION['max_concurrent'] + 1} hang-ups mid-answer on {ADMISSION['max_concurrent']} slots, "
              f"then one answer: {time.monotonic() - started:.2f} s")
    finally:
        server.stop()


def leave_queue(args) -> None:
    server = gateway(args.model, args.workdir, ADMISSION)
    long = {"prompt": "A long story.", "max_tokens": "2000"}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as first, \
                httpx.Client(base_url=server.url, timeout=120) as second, \
                first.stream("POST", "/v1/chat", data=long), second.stream("POST", "/v1/chat", data=long):
            body = b"prompt=hi&max_tokens=1&stream=false"
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                             b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_for(lambda: metric(server.url, "onellm_admission_waiting") == 1)
            left = time.monotonic()
            wait_for(lambda: metric(server.url, "onellm_admission_waiting") == 0)
            print(f"a queued client hanging up, to the queue being empty: {time.monotonic() - left:.3f} s")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["make-tiny", "fuzz", "trickle", "hang-up", "leave-queue"])
    parser.add_argument("--model", type=Path, default=REPO / "model_repo" / "tiny")
    parser.add_argument("--rounds", type=int, default=3, help="trickle: requests in each phase")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    {"make-tiny": make_tiny, "fuzz": fuzz, "trickle": trickle, "hang-up": hang_up,
     "leave-queue": leave_queue}[args.figure](args)


if __name__ == "__main__":
    main()
