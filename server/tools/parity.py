"""`onellm parity FIXTURE_DIR`: reproduce a reference fixture's outputs, modality by modality.

For each case of `reference.json` the fixture's preprocessed input goes through this project's
encoder and LLM; the prefix, the first logits and the greedy ids must match the authors' outputs.
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
    prefix_error: float
    logits_error: float
    ids_matched: int
    ids_total: int

    @property
    def ok(self) -> bool:
        return (self.prompt_ids_match and self.prefix_error <= PREFIX_TOLERANCE
                and self.logits_error <= LOGITS_TOLERANCE and self.ids_matched == self.ids_total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture", type=Path, help="folder with consolidated.00-of-01.pth, params.json, "
                        "tokenizer.model, reference.json, reference.safetensors")
    parser.add_argument("--clip-heads", type=int, default=16, help="CLIP attention heads (the fixture's: 2)")
    parser.add_argument("--model", type=Path, help="an already converted model folder (default: convert the fixture)")
    parser.add_argument("--vllm-url", help="decode the greedy ids through this vLLM server instead of in-process")


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
    return CaseResult(
        modality=modality,
        prompt_ids_match=ids == case["prompt_ids"],
        prefix_error=(prefix.float() - tensors[f"{modality}.prefix"]).abs().max().item(),
        logits_error=(logits - tensors[f"{modality}.logits0"]).abs().max().item(),
        ids_matched=sum(a == b for a, b in zip(generated, case["greedy_ids"])) if len(generated) == len(case["greedy_ids"]) else 0,
        ids_total=len(case["greedy_ids"]),
    )


def print_table(results: list[CaseResult]) -> None:
    print(f"{'modality':<9} {'prompt ids':>10} {'prefix max|err|':>16} {'logits0 max|err|':>17} {'greedy ids':>11}  result")
    for r in results:
        print(f"{r.modality:<9} {'same' if r.prompt_ids_match else 'DIFFER':>10} {r.prefix_error:>16.2e} "
              f"{r.logits_error:>17.2e} {f'{r.ids_matched}/{r.ids_total}':>11}  {'ok' if r.ok else 'FAIL'}")


def run_parity(fixture: Path, model_dir: Path, vllm_url: str | None) -> list[CaseResult]:
    reference = json.loads((fixture / "reference.json").read_text())
    tensors = load_file(fixture / "reference.safetensors")
    model = load_model(model_dir, dtype=torch.float32)
    llm = LocalEngine(model_dir / "llm", dtype=torch.float32)
    if vllm_url:
        from server.engines.vllm import VLLMEngine
        decoder = VLLMEngine(vllm_url)
    else:
        decoder = llm
    return [check_case(model, llm, decoder, m, case, tensors) for m, case in reference["cases"].items()]


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
        results = run_parity(fixture, Path(model_dir), args.vllm_url)
    print_table(results)
    failed = [r.modality for r in results if not r.ok]
    print(f"parity: {len(results) - len(failed)}/{len(results)} modalities match" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
