"""`onellm chat`: one question with attachments, or an interactive conversation, from the terminal."""

import argparse
import json
import sys
from pathlib import Path

from onellm_client._wire import UPLOAD_FIELDS
from onellm_client.client import DEFAULT_URL, Client, Session
from onellm_client.errors import APIConnectionError, APITimeoutError, OneLLMError

HELP = """commands:
  /image PATH   attach a file to your next message (also /video /audio /point /depth /normal /fmri /imu;
                /depth and /normal pair with an /image)
  /files        list what is attached to your next message
  /clear        forget the conversation and any attachments
  /quit         end (so does Ctrl-D)"""

FILE_HELP = {"image": "JPEG, PNG, WebP, ...", "video": "MP4, WebM, MOV, ...", "audio": "WAV, FLAC, OGG, MP3, ...",
             "point": "point cloud or mesh (.npy [N,3|6], PLY, OBJ, GLB, ...)",
             "depth": "depth map image, with --image", "normal": "normal map image, with --image",
             "fmri": "fMRI voxels (.npy or CSV)", "imu": "IMU accelerometer+gyroscope series (.npy or CSV, [T,6])"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the question; without it, chat interactively")
    files = parser.add_argument_group("attachments")
    for name in UPLOAD_FIELDS:
        files.add_argument(f"--{name}", metavar="PATH", help=FILE_HELP[name])
    files.add_argument("--imu-sample-rate", type=float, metavar="HZ",
                       help="sample rate of --imu (default: its CSV timestamps, else 200)")
    server = parser.add_argument_group("server")
    server.add_argument("--url", help=f"gateway URL (env ONELLM_URL; default {DEFAULT_URL})")
    server.add_argument("--api-key", help="bearer token (env ONELLM_API_KEY)")
    server.add_argument("--model", help="model name (default: the one the server serves)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, metavar="N")
    sampling.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (the default)")
    sampling.add_argument("--top-p", type=float, metavar="P")
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable)")
    sampling.add_argument("--system", metavar="TEXT", help="system prompt (default: the model's own)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print each answer's chat.completion JSON")
    output.add_argument("--no-stream", action="store_true", help="print each answer once it is complete")


def run(args: argparse.Namespace) -> int:
    sys.stdout.reconfigure(errors="replace")  # an answer must never crash a terminal that cannot show it
    with Client(args.url, args.api_key) as client:
        session = Session(client, args.system)
        files = {name: getattr(args, name) for name in UPLOAD_FIELDS if getattr(args, name)}
        if args.prompt is not None:
            try:
                answer(session, args.prompt, files, args)
            except (OneLLMError, OSError) as error:
                return report(error)
            except KeyboardInterrupt:
                return 130
            return 0
        return interactive(session, files, args)


def answer(session: Session, prompt: str, files: dict, args: argparse.Namespace) -> None:
    """Prints the answer to one turn, streamed unless --json or --no-stream."""
    options = {"imu_sample_rate": args.imu_sample_rate, "max_tokens": args.max_tokens,
               "temperature": args.temperature, "top_p": args.top_p, "stop": args.stop, "seed": args.seed,
               "model": args.model, **files}
    if args.json or args.no_stream:
        result = session.chat(prompt, stream=False, **options)
        print(json.dumps(result.raw, indent=2, ensure_ascii=False) if args.json else result.text)
        return
    with session.chat(prompt, **options) as stream:
        try:
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
        finally:
            print()


def interactive(session: Session, files: dict, args: argparse.Namespace) -> int:
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())
    try:
        greet(session.client)
    except OneLLMError as error:
        return report(error)
    while True:
        try:
            line = input(">>> " if tty else "").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not command(line, session, files):
                return 0
            continue
        try:
            answer(session, line, files, args)
        except (OneLLMError, OSError) as error:
            report(error)
        except KeyboardInterrupt:
            print("(stopped; this turn is not kept)", file=sys.stderr)
        files.clear()  # attachments belong to the turn they were sent with


def greet(client: Client) -> None:
    model = client.models()[0]
    print(f"chatting with '{model['id']}' at {client.base_url}; /help for commands, /quit to end", file=sys.stderr)
    if model.get("random_weights"):
        print("note: this model has random weights: its answers are meaningless", file=sys.stderr)


def command(line: str, session: Session, files: dict) -> bool:
    """Runs a /command; False ends the conversation."""
    name, _, rest = line[1:].partition(" ")
    path = rest.strip().strip("'\"")
    if name in ("quit", "exit", "bye"):
        return False
    if name in UPLOAD_FIELDS:
        if not path:
            print(f"usage: /{name} PATH", file=sys.stderr)
        elif not Path(path).expanduser().is_file():
            print(f"error: no such file: {path}", file=sys.stderr)
        else:
            files[name] = Path(path).expanduser()
            print(f"attached {path} as {name}; it goes with your next message", file=sys.stderr)
    elif name == "files":
        print("\n".join(f"{kind}: {p}" for kind, p in files.items()) or "nothing attached", file=sys.stderr)
    elif name == "clear":
        session.clear()
        files.clear()
        print("conversation cleared", file=sys.stderr)
    elif name == "help":
        print(HELP, file=sys.stderr)
    else:
        print(f"unknown command /{name}; /help lists them", file=sys.stderr)
    return True


def report(error: Exception) -> int:
    if isinstance(error, OSError):
        print(f"error: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
    elif isinstance(error, APIConnectionError) and not isinstance(error, APITimeoutError):
        print(f"error: {error} (is `onellm serve` running there?)", file=sys.stderr)
    else:
        print(f"error: {error}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="onellm-chat", description="chat with a OneLLM Serve gateway")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
