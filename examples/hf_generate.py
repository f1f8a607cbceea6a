"""Recipe: Hugging Face ``generate()`` with a static cache, its decode steps compiled by flashtune.

transformers compiles the model's forward for decoding when the cache is static and a
``CompileConfig`` is given; naming the backend there is all it takes. Prefill runs uncompiled (its
length changes from prompt to prompt), every decode step runs the compiled graph, whose linears
are tuned per bucket on first use (or by ``ft.warmup`` beforehand, as in examples/quickstart.py).

The model here is a small Llama with random weights (no download); with a real checkpoint, replace
``tiny_llama()`` by ``AutoModelForCausalLM.from_pretrained(name)``. On a GPU, drop
``_compile_all_devices``: transformers compiles on its own there. Under a minute on a 2-core CPU.

Run: python examples/hf_generate.py
"""

from __future__ import annotations

import time

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

import flashtune_compile as ft


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, in fp32, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def flashtune_compile_config(**options) -> CompileConfig:
    """The ``compile_config`` that makes ``generate()`` compile its decode step with flashtune.
    ``options`` go to the backend (e.g. ``cache_dir``); Inductor's mode is its default."""
    config = CompileConfig(fullgraph=True, backend="flashtune", mode=None, options=options or None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
    return config


def generate(model: LlamaForCausalLM, prompt: torch.Tensor, compile_config: CompileConfig | None, new_tokens: int):
    """Greedy tokens after ``prompt``, with a static cache (compiled decode steps when
    ``compile_config`` is given)."""
    with torch.no_grad():
        return model.generate(
            prompt,
            max_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            compile_config=compile_config,
            disable_compile=compile_config is None,
            pad_token_id=0,
        )


def main(new_tokens: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Generates with and without flashtune; returns (eager tokens, flashtune tokens)."""
    model = tiny_llama()
    prompt = torch.randint(1, 1024, (1, 12), generator=torch.Generator().manual_seed(1))
    eager = generate(model, prompt, None, new_tokens)
    start = time.perf_counter()
    tuned = generate(model, prompt, flashtune_compile_config(), new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = generate(model, prompt, flashtune_compile_config(), new_tokens)
    warm = time.perf_counter() - start
    same = torch.equal(tuned, eager) and torch.equal(again, eager)
    print(f"eager tokens:     {eager[0, prompt.shape[1] :].tolist()}")
    print(f"flashtune tokens: {tuned[0, prompt.shape[1] :].tolist()} ({'equal' if same else 'DIFFERENT'})")
    print(f"first generate (compile + tune): {first:.1f} s; second: {warm:.2f} s")
    stats = ft.stats()
    print(f"ops routed to flashtune: {stats['routed_ops']}; buckets tuned: {stats['misses']}")
    return eager, tuned


if __name__ == "__main__":
    main()
