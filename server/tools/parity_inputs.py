"""`onellm parity-inputs FIXTURE_DIR`: real files through the upload path, against the tensors
the authors' own preprocessing made from them.

`FIXTURE_DIR/cases.json` lists cases `{"name", "modality", "files": {upload field: path},
"options": {...}}`; `FIXTURE_DIR/expected.safetensors` holds one float32 tensor per case name,
without a batch dimension. Each case's files are grouped into an attachment and preprocessed
exactly as an upload with those fields and options is, with the gateway's decoder limits.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.config import DecoderLimits, Settings
from server.core.chat import group_uploads
from server.errors import InputError
from server.media.modalities import preprocess
from server.media.modalities.base import Decoding

TOLERANCE = 1e-3
# what the gateway sends when a request names no option (its form and JSON defaults)
REQUEST_DEFAULTS = {"imu_sample_rate": 200.0}


@dataclass
class CaseResult:
    name: str
    modality: str
    shape: tuple[int, ...] | None  # None: the upload was refused
    expected_shape: tuple[int, ...]
    error: float | None  # max |ours − expected|; None when the shapes differ
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.error is not None and self.error <= TOLERANCE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture", type=Path, help="folder with cases.json and expected.safetensors")


def check_case(fixture: Path, case: dict, expected: torch.Tensor, limits: DecoderLimits) -> CaseResult:
    uploads = [(field, (fixture / path).read_bytes()) for field, path in case["files"].items()]
    result = CaseResult(case["name"], case["modality"], None, tuple(expected.shape), None)
    try:
        attachments = group_uploads(uploads, {**REQUEST_DEFAULTS, **case.get("options", {})}, "")
        if [a.modality for a in attachments] != [case["modality"]]:
            result.problem = f"the files make {[a.modality for a in attachments]}, not one {case['modality']}"
            return result
        (attachment,) = attachments
        ours = preprocess(attachment.modality, attachment.files, Decoding(limits, **attachment.options))
    except InputError as error:
        result.problem = f"refused: {error.status} {error.message}"
        return result
    result.shape = tuple(ours.shape)
    if result.shape == result.expected_shape:
        result.error = (ours.float() - expected.float()).abs().max().item() if ours.numel() else 0.0
    return result


def run_cases(fixture: Path) -> list[CaseResult]:
    cases = json.loads((fixture / "cases.json").read_text())["cases"]
    expected = load_file(fixture / "expected.safetensors")
    limits = Settings.from_env().decoder_limits()
    results = []
    for case in cases:
        if case["name"] in expected:
            results.append(check_case(fixture, case, expected[case["name"]], limits))
        else:
            results.append(CaseResult(case["name"], case["modality"], None, (), None,
                                      "no tensor of this name in expected.safetensors"))
    return results


def print_table(results: list[CaseResult]) -> None:
    width = max(len(r.name) for r in results)
    print(f"{'case':<{width}}  {'modality':<8}  {'shape':<18}  {'max|err|':>9}  result")
    for r in results:
        shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
        if r.shape is not None and r.shape != r.expected_shape:
            shape += f" (expected {'x'.join(map(str, r.expected_shape))})"
        error = f"{r.error:.2e}" if r.error is not None else "-"
        print(f"{r.name:<{width}}  {r.modality:<8}  {shape:<18}  {error:>9}  {'ok' if r.ok else 'MISS'}"
              + (f"  {r.problem}" if r.problem else ""))


def run(args: argparse.Namespace) -> int:
    fixture = args.fixture
    missing = [f for f in ("cases.json", "expected.safetensors") if not (fixture / f).exists()]
    if missing:
        print(f"error: {fixture} is not a preprocessing fixture: missing {', '.join(missing)}")
        return 2
    results = run_cases(fixture)
    print_table(results)
    missed = [r.name for r in results if not r.ok]
    print(f"parity-inputs: {len(results) - len(missed)}/{len(results)} cases within {TOLERANCE:g}"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0
