"""The LLM half of bench/realsize.py: LLaMA-2-7B of random weights built in memory, run through the
embedded engine; prefill against the matmul rate, decode against read bandwidth ÷ bytes per token,
one image question end to end, and the hook for quantized files (server.engines.llamacpp)."""

import asyncio
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engines.base import Sampling
from server.engines.local import LocalEngine

# LLaMA-2-7B, the LLM of OneLLM-7B
SEVEN_B_LLM = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
QUESTION_TEXT_ROWS = 50  # the image question: 32 attachment rows + 50 text rows = 82
FILL_POOL = 1 << 20


def random_llm(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model with weights of the right scale but no meaning, built where it runs: no 13 GB file,
    no float32 copy. Each weight repeats one random pool (a broadcast copy runs at memory speed,
    where drawing 6.7 billion random numbers takes minutes on a small CPU)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    pool = (torch.randn(FILL_POOL, device=device) * 0.02).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                flat = param.view(-1)
                whole = flat.numel() // FILL_POOL * FILL_POOL
                flat[:whole].view(-1, FILL_POOL).copy_(pool.expand(whole // FILL_POOL, -1))
                flat[whole:].copy_(pool[: flat.numel() - whole])
    # RoPE's inverse frequencies are a buffer computed from the config, in float32: made again, for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval()


def bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: all but the input embedding table, of which it reads one row."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def decode_timing(engine, embeddings: torch.Tensor, tokens: int) -> dict:
    """Wall time to the first token (prefill) and the rate of the tokens after it (decode)."""
    start = time.perf_counter()
    stamps = []
    for _ in engine.token_ids(embeddings, Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)):
        stamps.append(time.perf_counter())
    return {"first_token_s": stamps[0] - start, "tokens": len(stamps),
            "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "total_s": stamps[-1] - start}


def prefill_flops(config: LlamaConfig, rows: int) -> int:
    """FLOPs of the prefill of `rows` prompt rows, counted on a model on the meta device: no weights are
    made, and llama.cpp's products (not torch's to count) are the same model's."""
    from realsize import count_flops

    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
        prompt = torch.empty(1, rows, config.hidden_size)
    return count_flops(lambda: model(inputs_embeds=prompt, logits_to_keep=1))


def prefill_and_decode(engine, dim: int, args, device, dtype, matmul_gflops: float, read_gb_s: float,
                       weight_bytes: int, flops: int) -> dict:
    from realsize import read_bandwidth, synchronizer

    def new_prompt():  # a prompt of rows no earlier one began with: the llama.cpp engine would reuse them
        return torch.randn(args.prefill_rows, dim, device=device, dtype=dtype) * 0.02

    engine.first_logits(new_prompt())  # warm-up
    sync = synchronizer(device)
    prompt = new_prompt()
    sync()
    start = time.perf_counter()
    engine.first_logits(prompt)
    sync()
    prefill_s = time.perf_counter() - start
    before = read_bandwidth(device, 0, args.read_gib)
    decode = decode_timing(engine, new_prompt(), args.answer_tokens)
    around = (before + read_bandwidth(device, 0, args.read_gib)) / 2
    return {"prefill_rows": args.prefill_rows, "prefill_s": prefill_s, "prefill_gflop": flops / 1e9,
            "prefill_rows_per_s": args.prefill_rows / prefill_s,
            "prefill_pct_of_matmul": 100 * flops / prefill_s / 1e9 / matmul_gflops,
            "decode": decode, "bytes_per_token": weight_bytes,
            "decode_pct_of_bandwidth": 100 * decode["tokens_per_s"] * weight_bytes / 1e9 / read_gb_s,
            "read_gb_per_s_around": around,
            "decode_pct_of_bandwidth_around": 100 * decode["tokens_per_s"] * weight_bytes / 1e9 / around}


def image_question(encoder, engine, device, dtype, answer_tokens: int) -> dict:
    """An image and a question of QUESTION_TEXT_ROWS tokens to `answer_tokens` tokens, every step timed
    together: encode, prompt assembly, prefill, decode."""
    image = torch.randn(1, 3, 224, 224, device=device, dtype=dtype)
    text_ids = list(range(100, 100 + QUESTION_TEXT_ROWS))
    start = time.perf_counter()
    prefix = encoder("image", image)[0]
    prompt = torch.cat([encoder.block("image", prefix), encoder.embed_tokens(text_ids)])
    decode = decode_timing(engine, prompt, answer_tokens)
    return {"prompt_rows": prompt.shape[0], "answer_tokens": decode["tokens"],
            "seconds": time.perf_counter() - start, "first_token_s": time.perf_counter() - start - decode["total_s"]
            + decode["first_token_s"]}


def llm_config(args) -> LlamaConfig:
    return LlamaConfig.from_pretrained(Path(args.model) / "llm") if args.model else LlamaConfig(**SEVEN_B_LLM)


def full_llm_config(args) -> LlamaConfig:
    """The full-weights LLM to build: LLaMA-2-7B, or the first --llm-layers of its layers where the
    whole does not fit (its ratios to the machine's rates are per layer; its times are not 7B's)."""
    config = llm_config(args)
    if args.llm_layers:
        config.num_hidden_layers = args.llm_layers
    return config


def build_engine(args, device, dtype) -> LocalEngine:
    if args.model:
        return LocalEngine(Path(args.model) / "llm", device, dtype)
    return LocalEngine.around(random_llm(full_llm_config(args), device, dtype))


def llm_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return (layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * vocab * d + d) * dtype.itemsize  # norms: 2 a layer + 1


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what can be taken without swapping or the OOM killer."""
    for row in Path("/proc/meminfo").read_text().splitlines():
        if row.startswith("MemAvailable:"):
            return int(row.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def room_for_llm(args, device, dtype) -> str | None:
    """Why the 7B LLM should not be built in this host's memory now (other jobs hold it), or None."""
    if args.model or device.type != "cpu":
        return None
    need = llm_bytes(full_llm_config(args), dtype) * 1.15  # activations, KV cache, the logits
    if (free := available_bytes()) < need:
        return f"{free / 2**30:.1f} GiB available, {need / 2**30:.1f} GiB needed"
    return None


def llm_figures(encoder, args, device, dtype, machine: dict, memory) -> dict:
    """The full-weights LLM's figures, where this host's memory holds it, then each quantized file's:
    on a CPU without native bfloat16 the full 7B LLM in float32 (27 GB) does not fit a small host,
    and the quantized files are what it serves."""
    from realsize import release_freed_heap

    name = str(dtype).removeprefix("torch.")
    matmul, read = machine["matmul"][name]["gflops"], machine["read_gb_per_s"]
    config = llm_config(args)
    flops = prefill_flops(config, args.prefill_rows)
    figures = {"prefill_gflop": flops / 1e9}
    if reason := room_for_llm(args, device, dtype):
        print(f"  LLM, full weights, skipped: {reason}", flush=True)
        figures["skipped"] = reason
    elif not args.skip_full_llm:
        full = full_llm_config(args)
        figures["layers"] = full.num_hidden_layers
        figures.update(full_llm_figures(encoder, args, device, dtype, matmul, read, memory,
                                        prefill_flops(full, args.prefill_rows)))
    if args.gguf:
        release_freed_heap()  # the quantized parts' peak memory is then what serving them holds beside the encoder
        figures["gguf"] = gguf_figures(encoder, args, config.hidden_size, device, dtype, matmul, read, memory, flops)
    return figures


def full_llm_figures(encoder, args, device, dtype, matmul: float, read: float, memory, prefill_flops: int) -> dict:
    with memory.phase("LLM") as peak:
        engine = build_engine(args, device, dtype)
        figures = prefill_and_decode(engine, engine.model.config.hidden_size, args, device, dtype, matmul, read,
                                     bytes_per_token(engine.model), prefill_flops)
        figures["image_question"] = image_question(encoder, engine, device, dtype, args.answer_tokens)
    figures["peak_bytes"] = peak.bytes
    print(f"  LLM {str(dtype).removeprefix('torch.')}, {engine.model.config.num_hidden_layers} layers: prefill {figures['prefill_rows_per_s']:.1f} rows/s "
          f"({figures['prefill_pct_of_matmul']:.0f} % of matmul); decode {figures['decode']['tokens_per_s']:.2f} tok/s"
          f" ({figures['decode_pct_of_bandwidth']:.0f} % of bandwidth ÷ bytes); image question "
          f"{figures['image_question']['seconds']:.1f} s", flush=True)
    return figures


def gguf_figures(encoder, args, dim: int, device, dtype, matmul: float, read: float, memory,
                 prefill_flops: int) -> dict:
    """Quantized files on llama.cpp, the same figures: bytes per token is the file's size (a close upper
    bound: it holds the embedding table too). Each file `DIR/llm-<type>.gguf` takes its tokenizer
    from `DIR/llm/tokenizer.model`, as `onellm quantize` lays them out."""
    from server.engines.llamacpp import LlamaCppEngine

    results = {}
    for path in map(Path, args.gguf.split(",")):
        with memory.phase(path.name) as peak:
            engine = LlamaCppEngine(path, tokenizer=path.parent / "llm" / "tokenizer.model",
                                    max_positions=SEVEN_B_LLM["max_position_embeddings"], sequences=1)
            figures = prefill_and_decode(engine, dim, args, torch.device("cpu"), torch.float32, matmul, read,
                                         path.stat().st_size, prefill_flops)
            figures["image_question"] = image_question(encoder, engine, device, dtype, args.answer_tokens)
            asyncio.run(engine.close())  # llama.cpp's own memory, which no garbage collection frees
        figures["peak_bytes"] = peak.bytes
        results[path.name] = figures
        print(f"  {path.name}: prefill {figures['prefill_s']:.2f} s; decode {figures['decode']['tokens_per_s']:.2f} "
              f"tok/s ({figures['decode_pct_of_bandwidth_around']:.0f} % of the bandwidth around it ÷ bytes); "
              f"image question {figures['image_question']['seconds']:.1f} s", flush=True)
    return results
