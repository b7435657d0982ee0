"""What structured-output rows cost a decode step: 32 plain rows against 32 rows of which
8 carry a ``json_schema`` grammar.

    python benchmarks/grammar_step.py [MODEL_DIR] [--rows 32] [--grammar-rows 8]
        [--steps 60] [--rounds 5] [--device cpu] [--torch-threads 1]

Drives the engine's own runner and sampler directly (no HTTP, no engine loop), so every
step has exactly ``--rows`` rows: one step is the forward pass, the grammar masks (filled
by xgrammar's matchers on the host), sampling and the one copy of the ids to the host.
Rows never finish: a grammar row whose JSON is complete starts over, so every step fills
the same number of masks. The two setups alternate for ``--rounds`` rounds, and the table
shows the median step of each and their ratio. Without MODEL_DIR the tiny test checkpoint
is built in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(TESTS_DIR.parent))

from oai_audio_server.engine.core import BatchingEngine  # noqa: E402
from oai_audio_server.engine.grammar import canonical_schema  # noqa: E402
from oai_audio_server.engine.loader import ModelBundle, load_bundle  # noqa: E402
from oai_audio_server.engine.runner import ModelRunner, PrefillWork  # noqa: E402
from oai_audio_server.engine.sampling import BatchSampler, RowSpec  # noqa: E402
from oai_audio_server.engine.types import GrammarSpec, SamplingParams  # noqa: E402
from oai_audio_server.models.block_manager import BlockManager  # noqa: E402
from oai_audio_server.models.kv_cache import blocks_needed  # noqa: E402
from oai_audio_server.qwen.conversation import Conversation, TextItem  # noqa: E402
from oai_audio_server.settings import Settings  # noqa: E402

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["speaker", "mood", "confident", "topic"],
    "properties": {
        "speaker": {"type": "string", "maxLength": 24},
        "mood": {"enum": ["calm", "angry", "happy", "sad"]},
        "confident": {"type": "boolean"},
        "topic": {"type": "string", "maxLength": 40},
    },
}


def step_times(
    bundle: ModelBundle, runner: ModelRunner, blocks: BlockManager, rows: int,
    grammar_rows: int, steps: int,
) -> list[float]:
    """Seconds per decode step of ``rows`` rows, the first ``grammar_rows`` constrained."""
    model = bundle.model
    assert model is not None
    compiled = bundle.grammars.compile(GrammarSpec("json_schema", canonical_schema(SCHEMA)))
    prompt = bundle.prompt_builder().build(Conversation(query=(TextItem("Describe it"),)))
    sampler = BatchSampler(runner.capacity, bundle.vocab_limit, bundle.device)
    greedy = SamplingParams(max_tokens=steps + 1, temperature=0.0)
    sampler.add_rows(0, [RowSpec(greedy, prompt.token_ids, compiled if i < grammar_rows else None)
                         for i in range(rows)])
    (embeds,) = model.embed_prompts([prompt.token_ids], [prompt.audio_segments])
    position = len(prompt.token_ids)
    variant = model.rotary_variant(position)
    tables = [blocks.allocate(blocks_needed(position + steps + 1, blocks.block_size))
              for _ in range(rows)]
    logits = runner.prefill([PrefillWork(embeds, 0, variant, table, wants_logits=True)
                             for table in tables])
    first = sampler.sample(logits)
    for index, table in enumerate(tables):
        runner.rows.load(index, first.ids[index : index + 1], position, variant, table)
    first.to_host()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step = sampler.sample(runner.decode(rows, position))
        runner.rows.advance(rows, step.ids)
        step.to_host()
        times.append(time.perf_counter() - started)
        position += 1
        for index in range(grammar_rows):  # a finished JSON starts over
            state_of = sampler.row(index)
            if state_of is not None and state_of.grammar.is_terminated():
                state_of.grammar.reset()
    runner.rows.clear_from(0)
    for table in tables:
        blocks.release(table)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--grammar-rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            from tiny_model import build_tiny_checkpoint

            model_dir = str(build_tiny_checkpoint(Path(scratch) / "tiny", seed=0))
        bundle = load_bundle(Settings(model=model_dir, device=args.device,
                                      max_model_len=512, cpu_threads=args.torch_threads))
        engine = BatchingEngine(lambda: bundle, max_batch_size=args.rows)
        with torch.inference_mode():
            runner = engine._make_runner(bundle)
            blocks = engine.blocks
            assert blocks is not None
            plain: list[float] = []
            constrained: list[float] = []
            step_times(bundle, runner, blocks, args.rows, args.grammar_rows, 5)  # warm-up
            for _ in range(args.rounds):
                plain += step_times(bundle, runner, blocks, args.rows, 0, args.steps)
                constrained += step_times(bundle, runner, blocks, args.rows,
                                          args.grammar_rows, args.steps)
    base = statistics.median(plain)
    with_grammar = statistics.median(constrained)
    print(f"device {bundle.device}, {args.rows} rows, {args.rounds} rounds of "
          f"{args.steps} steps each\n")
    print("| rows | grammar rows | median step | ratio |")
    print("|---|---|---|---|")
    print(f"| {args.rows} | 0 | {base * 1000:.2f} ms | 1.00 |")
    print(f"| {args.rows} | {args.grammar_rows} | {with_grammar * 1000:.2f} ms | "
          f"{with_grammar / base:.2f} |")


if __name__ == "__main__":
    main()
