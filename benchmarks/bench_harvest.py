"""Activation harvest throughput against the bare forward pass to the hook layer, same model and batch.

    python benchmarks/bench_harvest.py                         # tinylm, the default study's hook and batch
    python benchmarks/bench_harvest.py --layer 1 --hook mlp_out --batch-size 128
    python benchmarks/bench_harvest.py --hook-point blocks.0.hook_resid_mid

"harvest" is what the harness does per batch to fill the activation cache: `HarvestWriter.fill`
with the harness's own `harvester` (the TransformerBridge run to the hook, BOS dropped, rows copied
into the float32 memmap of acts.npy), one cache chunk (256 sequences) per call, into a real
memmap in a temporary folder.

"bare" is the cheapest honest forward that computes the same activation: a plain `NativeModel`
(TransformerLens's native torch module, no bridge components, no hook points) holding tinylm's
weights, run through the embeddings and the blocks up to and including the hook layer under
`torch.inference_mode`, nothing stored. Before timing, the benchmark checks that it gives the
harvested activations (allclose; the bridge computes LayerNorm from scratch, so they differ at
float-rounding scale). Both paths run the same chunks in the same batches, as back-to-back pairs
in alternating order (harvest, bare, bare, harvest, ...) so that a busy machine slows both alike;
tokens/s is each path's median chunk time, "harvest / bare" the median of the pairs' ratios.
Tokens/s counts every token through the model (BOS included), the same for both paths.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.schema import DataConfig  # noqa: E402
from experiments.data.sources import (CHUNK_SEQUENCES, HarvestWriter, harvester, load_subject_model,  # noqa: E402
                                 resolve_hooks, token_sequences)
from benchmarks.table import Table, add_docs_flag, check_docs, write_docs  # noqa: E402

BARE_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def bare_model(bridge) -> torch.nn.Module:
    """A plain NativeModel with the bridge's weights: the bridge wraps the original model's
    submodules in place, so `bridge.original_model` itself is no longer bare."""
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    bare = NativeModel(copy.deepcopy(bridge.cfg))
    state = {k.replace("_original_component.", ""): v for k, v in bridge.original_model.state_dict().items()}
    missing, _ = bare.load_state_dict(state, strict=False)  # the bridge adds aliases (mlp.in/out), not fewer keys
    if missing:
        raise RuntimeError(f"bare model: weights not found for {missing}")
    return bare.eval()


def bare_forward(bare: torch.nn.Module, hook_name: str):
    """tokens [B, T] -> the activation at `hook_name`, computed with plain modules, no hooks."""
    parts = hook_name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in BARE_HOOKS:
        raise SystemExit(f"the bare path covers blocks.<layer>.{{{','.join(BARE_HOOKS)}}}, not {hook_name!r}")
    layer, hook = int(parts[1]), parts[2]

    def run(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
        x = bare.tok_embed(tokens) + bare.pos(positions)
        for block in bare.layers[:layer]:
            (x,) = block(x)
        if hook == "hook_resid_pre":
            return x
        block = bare.layers[layer]  # NativeBlock.forward, written out to expose its intermediates
        attn_out, _ = block.attn(block.ln1(x))
        mid = x + attn_out
        if hook in ("hook_attn_out", "hook_resid_mid"):
            return attn_out if hook == "hook_attn_out" else mid
        mlp_out = block.mlp(block.ln2(mid))
        return mlp_out if hook == "hook_mlp_out" else mid + mlp_out

    return run


def measure(model, hook_name: str, sequences: torch.Tensor, batches: list[int], chunks: int, repeats: int,
            table: Table) -> None:
    """One row per batch size for the hook: each path's tokens/s and the harvest's share of the bare speed."""
    harvest = harvester(model, hook_name, "cpu")
    bare = bare_forward(bare_model(model.bridge), hook_name)
    with torch.inference_mode():
        want, got = harvest(sequences[:8]), bare(sequences[:8])
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"bare path disagrees with the harvest at {hook_name}: "
                         f"max |diff| {float((want - got).abs().max()):.3g}")
    n_seq, seq_len, d_in = sequences.shape[0], sequences.shape[1], want.shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        acts = np.lib.format.open_memmap(Path(tmp) / "acts.npy", mode="w+", dtype=np.float32,
                                         shape=(n_seq * (seq_len - 1), d_in))
        for batch in batches:
            writer = HarvestWriter(sequences, d_in, harvest, batch, eval_fraction=0.1)

            def run_harvest(chunk):
                for _ in writer.fill(chunk, acts, Path(tmp)):
                    pass

            def run_bare(chunk):
                for b in range(chunk * CHUNK_SEQUENCES, (chunk + 1) * CHUNK_SEQUENCES, batch):
                    bare(sequences[b:b + batch])

            times = {"harvest": [], "bare": []}
            with torch.inference_mode():  # as build_or_open runs the writer
                run_harvest(0), run_bare(0)  # warm-up: allocator, thread pool
                for repeat in range(repeats):
                    for chunk in range(chunks):  # pairs on the same chunk, back to back, in alternating order
                        for name in ("harvest", "bare") if (repeat + chunk) % 2 == 0 else ("bare", "harvest"):
                            start = time.perf_counter()
                            (run_harvest if name == "harvest" else run_bare)(chunk)
                            times[name].append(time.perf_counter() - start)
            rate = {name: CHUNK_SEQUENCES * seq_len / statistics.median(t) for name, t in times.items()}
            ratio = statistics.median(b / h for h, b in zip(times["harvest"], times["bare"]))
            table.add(hook_name, batch, f"{rate['harvest']:,.0f}", f"{rate['bare']:,.0f}", f"{ratio:.0%}")


def main() -> None:
    defaults = DataConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", default=str(defaults.layer), help=f"layers, comma-separated (default: {defaults.layer})")
    p.add_argument("--hook", default=defaults.hook, help=f"default: {defaults.hook}")
    p.add_argument("--hook-point", default=None, help="full hook name; overrides --layer and --hook")
    p.add_argument("--batch-size", default=str(defaults.harvest_batch_size),
                   help=f"harvest batch sizes, comma-separated (default: {defaults.harvest_batch_size}, the study's)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help=f"default: {defaults.seq_len}")
    p.add_argument("--chunks", type=int, default=2, help="cache chunks of 256 sequences (default: 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes over the chunks (default: 10)")
    p.add_argument("--models-dir", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "models"),
                   help="where tinylm is cached (default: checkpoints/models; trained there on first use)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    add_docs_flag(p, "bench_harvest")
    a = p.parse_args()
    check_docs(a, "bench_harvest")
    if a.threads:
        torch.set_num_threads(a.threads)

    n_seq = a.chunks * CHUNK_SEQUENCES
    data = [DataConfig(layer=int(layer), hook=a.hook, hook_point=a.hook_point, n_samples=n_seq, seq_len=a.seq_len)
            for layer in ([defaults.layer] if a.hook_point else a.layer.split(","))]
    model = load_subject_model(data[0], Path(a.models_dir), progress=False)
    sequences = token_sequences(model, data[0], seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {model.name}, "
          f"{n_seq} sequences x {a.seq_len} tokens per repeat, {a.repeats} repeats; the bare path is checked "
          f"against the harvest first")
    table = Table(["hook", "batch", "harvest tokens/s", "bare tokens/s", "harvest ÷ bare"], [24])
    for cfg in data:
        measure(model, resolve_hooks(model, cfg)[0], sequences, [int(b) for b in a.batch_size.split(",")], a.chunks,
                a.repeats, table)
    write_docs(a, "bench_harvest", [table.markdown(), f"{model.name}, {a.seq_len} tokens per sequence, median of "
                                    f"{a.repeats} passes over {n_seq} sequences."])


if __name__ == "__main__":
    main()
