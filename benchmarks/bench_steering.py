"""Does steering with a concept latent move the model's next token towards that concept?

    python benchmarks/bench_steering.py --study-dir checkpoints/default                 # topk-k32-auxk
    python benchmarks/bench_steering.py --study-dir checkpoints/default --concept category:colours

Picks a concept category in one arm of a tinylm study (--concept, else the category some latent
matches best) and two latents for it: "fires", the latent whose firing matches the category best
(the feature analysis' in-sample F1, experiments/eval/features.py), and "promotes", the latent
whose decoder row raises the category's logits most (W_dec[i] @ W_U, relative to the mean logit).
A latent that fires on animal words says "this token is an animal", which is not the same as "an
animal comes next": the two can steer differently. Prompts are tinylm validation stories (which
neither the model nor the SAE trained on), cut just before a word of the category ("before": it
could come next) or at a random position ("anywhere"). For each alpha it adds alpha * W_dec[i] at
the arm's hook at every position but BOS (the explorer's "add" steering,
experiments/explorer/core.py) and measures, after the prompt, the next-token probability mass on
the category's tokens (tinylm_concepts), its mean over the prompts, and how often the most likely
token is one of them. Alphas are given as multiples of the latent's largest activation on the eval
split (--alphas); the table also shows alpha and the push's size relative to the activation's mean
norm on the prompts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.table import Table, add_docs_flag, check_docs, write_docs  # noqa: E402
from experiments.eval.concepts import tinylm_concepts  # noqa: E402
from experiments.explorer import Explorer  # noqa: E402
from models.tinylm.corpus import validation_stories  # noqa: E402


def pick_latents(fa, w_dec: torch.Tensor, w_u: torch.Tensor, concept: str | None, ids_of) -> tuple[str, dict]:
    """The concept (`concept`, or the category some latent matches best) and two latents for it:
    "fires", the latent whose firing matches it best (in-sample F1), and "promotes", the alive latent
    whose decoder row raises the concept's logits most over the mean logit (W_dec[i] @ W_U)."""
    a, names = fa.arrays, fa.concept_names
    index, f1 = a["concept_index"], a["concept_f1"]
    if concept is None:
        cats = np.flatnonzero(np.isin(index, [c for c, n in enumerate(names) if n.startswith("category:")]))
        if not cats.size:
            raise SystemExit("error: no latent matches a category best in this arm's analysis")
        concept = names[int(index[cats[np.argmax(f1[cats])]])]
    if concept not in names:
        raise SystemExit(f"error: no concept {concept!r} in this arm's analysis (e.g. {', '.join(names[:12])})")
    mine = np.flatnonzero(index == names.index(concept))
    if not mine.size:
        raise SystemExit(f"error: no latent matches {concept} best")
    logits = w_dec.detach().float() @ w_u.detach().float()  # [d_sae, vocab]
    lift = (logits[:, ids_of(concept)].mean(1) - logits.mean(1)).numpy()
    lift[a["n_fired"] == 0] = -np.inf
    return concept, {"fires": int(mine[np.argmax(f1[mine])]), "promotes": int(np.argmax(lift))}


def prompts_from(tokenizer, ids: set[int], n: int, seed: int, n_ctx: int, min_prefix: int = 3
                 ) -> dict[str, list[list[int]]]:
    """Token ids of validation stories: "before" cut before the story's first concept token (at least
    min_prefix tokens in), "anywhere" cut at a seeded random position; n of each, BOS not included."""
    rng = np.random.default_rng(seed)
    out = {"before": [], "anywhere": []}
    for story in validation_stories(20 * n, seed):
        toks = tokenizer(story, add_special_tokens=False)["input_ids"][: n_ctx - 1]
        at = next((j for j, t in enumerate(toks) if t in ids and j >= min_prefix), None)
        if at is not None and len(out["before"]) < n:
            out["before"].append(toks[:at])
        if len(toks) > min_prefix and len(out["anywhere"]) < n:
            out["anywhere"].append(toks[:int(rng.integers(min_prefix, len(toks)))])
        if min(map(len, out.values())) == n:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", default="checkpoints/default", help="a finished tinylm study (default: %(default)s)")
    p.add_argument("--arm", default="topk-k32-auxk", help="the arm, by name or folder (default: %(default)s)")
    p.add_argument("--concept", default=None, help="e.g. category:colours (default: the best-matched category)")
    p.add_argument("--prompts", type=int, default=50, help="prompts of each kind (default: %(default)s)")
    p.add_argument("--alphas", default="-8,-2,0,2,8,16",
                   help="alphas as multiples of the latent's largest eval activation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="validation stories' seed (default: %(default)s)")
    add_docs_flag(p, "bench_steering")
    args = p.parse_args()
    check_docs(args, "bench_steering")
    torch.set_num_threads(1)  # as the explorer's server: one short sequence at a time

    ex = Explorer(args.study_dir)
    rec = ex.arm(args.arm)
    ta = ex.trained(rec)
    fa = ex.analysis(rec.name)
    tok, bos, hook = ta.model.tokenizer, ta.model.bos_token_id, ta.hook_name
    concepts = tinylm_concepts(tok)

    def ids_of(name: str) -> list[int]:
        return concepts.token_ids[concepts.names.index(name)]

    concept, latents = pick_latents(fa, ta.sae.W_dec, ta.model.bridge.W_U, args.concept, ids_of)
    ids = ids_of(concept)
    prompts = prompts_from(tok, set(ids), args.prompts, args.seed, ta.model.n_ctx)
    sequences = {k: [torch.tensor([[bos, *p_ids]]) for p_ids in v] for k, v in prompts.items()}
    with torch.no_grad():
        x_norm = float(np.mean([ta.activations(s).norm(dim=-1).mean().item() for v in sequences.values() for s in v]))
    members = ", ".join(tok.decode([t]).strip() for t in ids[:6]) + (", ..." if len(ids) > 6 else "")
    about = []
    for pick, latent in latents.items():
        promoted = ", ".join(tok.decode([int(t)]).strip() for t in fa.arrays["logit_top_ids"][latent][:4])
        about.append(f"**{pick}** = latent {latent} (label '{fa.labels[latent]}', F1 "
                     f"{fa.arrays['concept_f1'][latent]:.2f} for {fa.concept_names[int(fa.arrays['concept_index'][latent])]}, "
                     f"largest eval activation {fa.arrays['max_act'][latent]:.2f}, ‖W_dec‖ "
                     f"{ta.sae.W_dec[latent].norm().item():.3f}, promotes {promoted})")
    intro = (f"Arm `{rec.name}`, concept `{concept}` ({len(ids)} tokens: {members}); {'; '.join(about)}. Prompts: "
             f"{len(prompts['before'])} validation stories cut just before a word of the concept (**before**) and "
             f"{len(prompts['anywhere'])} cut at a random position (**anywhere**); the activation's mean norm on them is "
             f"{x_norm:.2f}. p: mean next-token probability mass on the concept's tokens; top-1: prompts whose most "
             f"likely next token is one of them.")
    print(intro)
    table = Table(["latent", "alpha / max act", "alpha", "push / ‖x‖", "p before", "change", "top-1 before",
                   "p anywhere", "change", "top-1 anywhere"], widths=[15], left=1)

    @torch.no_grad()
    def measure(latent: int, alpha: float) -> dict[str, tuple[float, float]]:
        hooks = [(hook, ex.steering_hook(ta, [latent], alpha, "add"))]
        out = {}
        for kind, seqs in sequences.items():
            probs = [torch.softmax(ta.model.bridge.run_with_hooks(s, return_type="logits", fwd_hooks=hooks)[0, -1]
                                   .float(), -1) for s in seqs]
            out[kind] = (float(np.mean([q[ids].sum().item() for q in probs])),
                         float(np.mean([int(q.argmax()) in ids for q in probs])))
        return out

    for pick, latent in latents.items():
        max_act, w_norm = float(fa.arrays["max_act"][latent]), ta.sae.W_dec[latent].norm().item()
        base = measure(latent, 0.0)
        for m in [float(v) for v in args.alphas.split(",")]:
            alpha = m * max_act
            r = base if m == 0 else measure(latent, alpha)
            cells = []
            for kind in ("before", "anywhere"):
                mass, top1 = r[kind]
                cells += [f"{mass:.3f}", "" if m == 0 else f"{mass - base[kind][0]:+.3f}", f"{top1:.0%}"]
            table.add(f"{pick} ({latent})", f"{m:g}", f"{alpha:.2f}", f"{abs(alpha) * w_norm / x_norm:.2f}", *cells)
    write_docs(args, "bench_steering", [intro, table.markdown()])


if __name__ == "__main__":
    main()
