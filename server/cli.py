"""`onellm` console script: each subcommand lives in its own module with `add_arguments` and `run`."""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "convert": ("server.tools.convert", "convert a OneLLM checkpoint into a model folder"),
    "quantize": ("server.tools.quantize", "write a model's LLM with weight-only quantized matrices (GGUF, for llama.cpp)"),
    "make-tiny": ("server.tools.make_tiny", "build a small random-weight OneLLM model folder, offline"),
    "parity": ("server.tools.parity", "check this implementation against a reference fixture"),
    "parity-inputs": ("server.tools.parity_inputs", "check preprocessing of real files against a fixture"),
    "serve": ("server.entrypoints.serve_command", "run the HTTP gateway"),
    "chat": ("onellm_client.cli", "chat with a running gateway from the terminal"),
    "batch": ("onellm_client.batch_cli", "submit a batch to a running gateway, follow it, read its results"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="onellm", description="OneLLM Serve")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage and exits
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f"onellm {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
