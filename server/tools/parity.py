"""`onellm parity FIXTURE_DIR`: reproduce a reference fixture's outputs, modality by modality.

For each case of `reference.json` the fixture's preprocessed input goes through this project's
encoder and LLM; the prefix, the first logits and the greedy ids must match the authors' outputs
(float32). With `--dtype bfloat16` (or float16) the same runs in that dtype, and with
`--llm-weights q8_0` (or q4_0, q4_k) the LLM runs on weights `onellm quantize` wrote, served by llama.cpp;
the table then says how far that is from the authors' float32: a measurement of accuracy, not a
parity check.
"""

import argparse
import asyncio
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.engines.base import Sampling, Usage
from server.engines.local import LocalEngine
from server.model.onellm import OneLLM, load_model

PREFIX_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-4


@dataclass
class CaseResult:
    modality: str
    prompt_ids_match: bool
    prefix_error: float  # max |ours - reference|
    prefix_relative: float  # that, over the reference's largest |value|
    logits_error: float
    logits_relative: float
    ids_matched: int  # greedy ids equal to the reference's before the first that differs
    ids_total: int

    @property
    def ok(self) -> bool:
        return (self.prompt_ids_match and self.prefix_error <= PREFIX_TOLERANCE
                and self.logits_error <= LOGITS_TOLERANCE and self.ids_matched == self.ids_total)


def errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Max absolute error, and that over the reference's largest magnitude."""
    error = (ours.float() - reference).abs().max().item()
    return error, error / reference.abs().max().item()


def leading_matches(generated: list[int], reference: list[int]) -> int:
    """How many ids agree before the first that differs: after it the two continue different texts."""
    count = 0
    for ours, theirs in zip(generated, reference):
        if ours != theirs:
            break
        count += 1
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture", type=Path, help="folder with consolidated.00-of-01.pth, params.json, "
                        "tokenizer.model, reference.json, reference.safetensors")
    parser.add_argument("--clip-heads", type=int, default=16, help="CLIP attention heads (the fixture's: 2)")
    parser.add_argument("--model", type=Path, help="an already converted model folder (default: convert the fixture)")
    parser.add_argument("--vllm-url", help="decode the greedy ids through this vLLM server instead of in-process")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="compute in this dtype; other than float32, report how far it is from the reference")
    parser.add_argument("--llm-weights", choices=("full", "q8_0", "q4_0", "q4_k"), default="full",
                        help="the LLM's weights: quantized ones (the model folder's llm-<type>.gguf, written "
                        "if missing) are run by llama.cpp; report how far they are from the reference")


def greedy_ids(engine, embeddings: torch.Tensor, count: int) -> list[int]:
    """`count` greedy tokens through the engine's streaming interface, EOS and stop strings ignored."""
    sampling = Sampling(max_tokens=count, temperature=0.0, stop=(), ignore_eos=True)
    usage = Usage()

    async def drain():
        async for _ in engine.stream(embeddings, sampling, usage):
            pass

    asyncio.run(drain())
    return usage.token_ids


def check_case(model: OneLLM, llm: LocalEngine, decoder, modality: str, case: dict,
               tensors: dict[str, torch.Tensor]) -> CaseResult:
    prefix = model.encode(modality, tensors[f"{modality}.input"])[0]  # [30, D]
    ids = model.prompt_ids([("user", case["question"])])
    embeddings = model.embeddings(case["prompt_ids"], [(modality, prefix)])
    logits = llm.first_logits(embeddings)
    generated = greedy_ids(decoder, embeddings, len(case["greedy_ids"]))
    return CaseResult(modality, ids == case["prompt_ids"], *errors(prefix, tensors[f"{modality}.prefix"]),
                      *errors(logits, tensors[f"{modality}.logits0"]),
                      leading_matches(generated, case["greedy_ids"]), len(case["greedy_ids"]))


def print_table(results: list[CaseResult], verdict: bool) -> None:
    """One row per modality; `verdict` adds whether it is within the float32 tolerances."""
    print(f"{'modality':<9} {'prompt ids':>10} {'prefix max|err|':>16} {'relative':>9} {'logits0 max|err|':>17} "
          f"{'relative':>9} {'greedy ids':>11}" + ("  result" if verdict else ""))
    for r in results:
        print(f"{r.modality:<9} {'same' if r.prompt_ids_match else 'DIFFER':>10} {r.prefix_error:>16.2e} "
              f"{r.prefix_relative:>9.2e} {r.logits_error:>17.2e} {r.logits_relative:>9.2e} "
              f"{f'{r.ids_matched}/{r.ids_total}':>11}" + (f"  {'ok' if r.ok else 'FAIL'}" if verdict else ""))


def run_parity(fixture: Path, model_dir: Path, vllm_url: str | None, dtype: str = "float32",
               llm_weights: str = "full", scratch: Path | None = None) -> list[CaseResult]:
    reference = json.loads((fixture / "reference.json").read_text())
    tensors = load_file(fixture / "reference.safetensors")
    model = load_model(model_dir, dtype=dtype)
    llm = LocalEngine(model_dir / "llm", dtype=model.dtype) if llm_weights == "full" else \
        quantized_engine(model, llm_weights, scratch)
    if vllm_url:
        from server.engines.vllm import VLLMEngine
        decoder = VLLMEngine(vllm_url, dtype=model.dtype)
    else:
        decoder = llm
    return [check_case(model, llm, decoder, m, case, tensors) for m, case in reference["cases"].items()]


def quantized_engine(model: OneLLM, weight_type: str, scratch: Path | None) -> LocalEngine:
    """llama.cpp on the folder's llm-<type>.gguf; one written into `scratch` when the folder has none."""
    from server.engines.llamacpp import LlamaCppEngine
    from server.tools.quantize import gguf_path, quantize

    path = gguf_path(model.path, weight_type)
    if not path.is_file():
        path = quantize(model.path, weight_type, out=Path(scratch or tempfile.mkdtemp()) / path.name)
    return LlamaCppEngine(path, model.path / "llm" / "tokenizer.model", model.config["llm"]["max_positions"], sequences=1)


def run(args: argparse.Namespace) -> int:
    fixture = args.fixture
    missing = [f for f in ("reference.json", "reference.safetensors") if not (fixture / f).exists()]
    if missing:
        print(f"error: {fixture} is not a parity fixture: missing {', '.join(missing)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="onellm-parity-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from server.tools.convert import convert
            model_dir = convert(checkpoint=fixture / "consolidated.00-of-01.pth", params=fixture / "params.json",
                                tokenizer=fixture / "tokenizer.model", out=Path(tmp) / "model",
                                clip_heads=args.clip_heads, dtype="float32", name="parity")
        results = run_parity(fixture, Path(model_dir), args.vllm_url, args.dtype, args.llm_weights, Path(tmp))
    if args.dtype != "float32" or args.llm_weights != "full":
        print_table(results, verdict=False)
        weights = "" if args.llm_weights == "full" else f", LLM weights {args.llm_weights} (llama.cpp)"
        print(f"{args.dtype}{weights} against the reference's float32; greedy ids: those before the first that differs")
        return 0 if all(r.prompt_ids_match for r in results) else 1
    print_table(results, verdict=True)
    failed = [r.modality for r in results if not r.ok]
    print(f"parity: {len(results) - len(failed)}/{len(results)} modalities match" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
