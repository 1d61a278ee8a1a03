"""`onellm batch`: submit a batch, follow it with a progress line and an ETA, read its results, or
make its input from a folder of files and a prompt."""

import argparse
import sys
from pathlib import Path

from onellm_client import batches
from onellm_client.client import DEFAULT_URL, Client
from onellm_client.errors import OneLLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"gateway URL (env ONELLM_URL; default {DEFAULT_URL})")
    parser.add_argument("--api-key", help="bearer token (env ONELLM_API_KEY)")
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = commands.add_parser("submit", help="upload a JSONL file of requests and start a batch")
    submit.add_argument("file", type=Path, metavar="FILE.jsonl")
    submit.add_argument("--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/responses"])
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and return at once")
    state = commands.add_parser("status", help="a batch's state; with --wait, follow it to its end")
    state.add_argument("batch_id", metavar="ID")
    state.add_argument("--wait", action="store_true")
    result = commands.add_parser("results", help="a batch's output lines (JSONL), or with --errors its failed ones")
    result.add_argument("batch_id", metavar="ID")
    result.add_argument("--errors", action="store_true")
    result.add_argument("--out", type=Path, metavar="FILE", help="write them here instead of to stdout")
    folder = commands.add_parser("from-folder", help="one request per file of DIR, each asked PROMPT")
    folder.add_argument("folder", type=Path, metavar="DIR")
    folder.add_argument("--prompt", required=True)
    folder.add_argument("--modality", choices=["image", "video", "audio", "point", "fmri", "imu"],
                        help="the modality of every file (needed for .npy and .csv arrays)")
    folder.add_argument("--max-tokens", type=int, metavar="N")
    folder.add_argument("--out", type=Path, metavar="FILE.jsonl", help="write the lines here and submit nothing")


def _show(line: str) -> None:
    # one line, rewritten in place on a terminal; every update on a line of its own elsewhere (logs)
    end = "" if sys.stderr.isatty() else "\n"
    print(f"\r{line}\033[K" if end == "" else line, end=end, file=sys.stderr, flush=True)


def _submitted(client: Client, data: bytes, endpoint: str, wait: bool) -> int:
    batch = batches.submit(client, data, endpoint)
    print(batch["id"])
    return _followed(client, batch["id"]) if wait else 0


def _followed(client: Client, batch_id: str) -> int:
    batch = batches.follow(client, batch_id, _show)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for error in (batch.get("errors") or {}).get("data") or []:
        print(f"line {error.get('line')}: {error['message']}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


def _act(client: Client, args: argparse.Namespace) -> int:
    if args.action == "submit":
        return _submitted(client, args.file.read_bytes(), args.endpoint, not args.no_wait)
    if args.action == "status":
        return _followed(client, args.batch_id) if args.wait else _printed_status(client, args.batch_id)
    if args.action == "results":
        data = batches.results(client, batches.status(client, args.batch_id), args.errors)
        if args.out:
            args.out.write_bytes(data)
        else:
            sys.stdout.buffer.write(data)
        return 0
    model = client.models()[0]["id"]
    data = batches.jsonl(batches.folder_lines(client, args.folder, args.prompt, model, args.modality, args.max_tokens))
    if args.out:
        args.out.write_bytes(data)
        return 0
    return _submitted(client, data, "/v1/chat/completions", True)


def _printed_status(client: Client, batch_id: str) -> int:
    batch = batches.status(client, batch_id)
    print(batches.progress_line(batch, 0.0, 0, 0.0))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, args.api_key) as client:
            return _act(client, args)
    except (OneLLMError, ValueError, OSError) as e:
        print(f"onellm batch: {e}", file=sys.stderr)
        return 2
