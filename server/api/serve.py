"""`onellm serve`: run the gateway with uvicorn. Each option also reads `ONELLM_<OPTION>` from the environment."""

import argparse
import logging

import uvicorn

from server.api.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (env ONELLM_MODEL; default model_repo/tiny)")
    parser.add_argument("--vllm-url", help="vLLM OpenAI server to decode on (env ONELLM_VLLM_URL); "
                        "without it the embedded in-process engine serves")
    parser.add_argument("--host", help="address to listen on (env ONELLM_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env ONELLM_PORT; default 8080)")
    parser.add_argument("--device", help="torch device of the encoder and local engine (env ONELLM_DEVICE; default cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="encoder dtype (env ONELLM_DTYPE; default: as stored)")
    parser.add_argument("--allowed-url-hosts", type=lambda v: tuple(h for h in v.split(",") if h),
                        help="comma-separated hosts whose http(s) attachment URLs may be fetched "
                        "(env ONELLM_ALLOWED_URL_HOSTS; default none)")
    parser.add_argument("--encoder-max-batch", type=int, help="requests of one modality encoded as one batch "
                        "(env ONELLM_ENCODER_MAX_BATCH; default 8)")
    parser.add_argument("--encoder-max-wait-ms", type=float, help="longest wait for a batch to fill "
                        "(env ONELLM_ENCODER_MAX_WAIT_MS; default 5)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="env ONELLM_LOG_LEVEL")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(**vars(args))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.api.app import create_app
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)
    return 0
