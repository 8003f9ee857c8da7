"""Greedy tokens and logits of the tiny test model on two targets, and how close they are.

    compare_greedy.py model SOURCE OUT.gguf          the tests' tiny model (seed 42, llama.cpp's
                                                     SPM vocabulary from the SOURCE tree)
    compare_greedy.py run LIBDIR MODEL OUT [--force REF.json]
                                                     greedy decoding through nexabind.lowlevel:
                                                     OUT.json (tokens) and OUT.npy (logits)
    compare_greedy.py compare REF.json OTHER.json    the report; exit 1 on a real disagreement

``run`` decodes N_STEPS tokens greedily (argmax), and separately feeds the tokens of ``--force``
(teacher forcing: the same positions see the same context on both targets) and keeps each step's
logits. ``compare`` says whether the free-running greedy tokens match; then, at the forced
positions, the top-1 agreement and the largest logit difference. A top-1 disagreement counts as
real only where the reference's best two logits are further apart than the largest difference
seen (different SIMD paths sum floats in a different order; a near tie may flip).

Run with a Python that has nexabind installed (the arm64 root's, or this checkout's venv).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea,"
N_STEPS = 32
N_CTX = 256
N_THREADS = 2


def write_model(source: Path, out: Path) -> None:
    from nexabind.tinymodel import ModelSpec, write_random_model

    write_random_model(out, ModelSpec(), vocab=source / "models" / "ggml-vocab-llama-spm.gguf")


def _decode(libdir: str, model_path: str, force: list[int] | None) -> tuple[list[int], list]:
    """Greedy tokens, or (with ``force``) the argmax at each forced step and its logits."""
    import numpy as np

    from nexabind import lowlevel

    lowlevel.lib(libdir)
    with (
        lowlevel.Model(model_path) as model,
        lowlevel.Context(model, n_ctx=N_CTX, n_batch=N_CTX, n_threads=N_THREADS) as ctx,
    ):
        prompt = model.tokenize(PROMPT)
        ctx.batch.set(prompt, 0)
        ctx.decode()
        tokens: list[int] = []
        logits = []
        for i in range(N_STEPS):
            row = ctx.logits(-1)
            best = int(np.argmax(row))
            tokens.append(best)
            logits.append(row.copy())
            nxt = force[i] if force is not None else best
            ctx.batch.set_one(nxt, len(prompt) + i)
            ctx.decode()
    return tokens, logits


def run(libdir: str, model_path: str, out: Path, ref: Path | None) -> None:
    import numpy as np

    from nexabind import lowlevel
    from nexabind.platform import target

    greedy, own_logits = _decode(libdir, model_path, None)
    forced = None
    logits = own_logits
    if ref is not None:
        forced_tokens = json.loads(ref.read_text())["greedy"]
        forced, logits = _decode(libdir, model_path, forced_tokens)
    np.save(out.with_suffix(".npy"), np.stack(logits))
    report = {
        "target": "-".join(target()),
        "system_info": lowlevel.system_info(),
        "prompt": PROMPT,
        "greedy": greedy,
        "forced_argmax": forced,
    }
    out.with_suffix(".json").write_text(json.dumps(report) + "\n")


def compare(ref_path: Path, other_path: Path) -> int:
    import numpy as np

    ref = json.loads(ref_path.read_text())
    other = json.loads(other_path.read_text())
    a = np.load(ref_path.with_suffix(".npy"))
    b = np.load(other_path.with_suffix(".npy"))
    same = ref["greedy"] == other["greedy"]
    first = next(
        (i for i, (x, y) in enumerate(zip(ref["greedy"], other["greedy"], strict=False)) if x != y),
        None,
    )
    print(f"{ref['target']} against {other['target']}: {N_STEPS} greedy tokens of the tiny model")
    print(
        f"  greedy tokens match: {same}" + ("" if same else f" (first difference at step {first})")
    )
    top1 = other["forced_argmax"] or other["greedy"]
    agree = [x == y for x, y in zip(ref["greedy"], top1, strict=False)]
    diff = np.abs(a - b)
    max_diff = float(diff.max())
    scale = float(np.abs(a).max())
    print(f"  top-1 agreement at the same positions: {sum(agree)}/{len(agree)}")
    print(f"  largest logit difference: {max_diff:.3g} (largest |logit| {scale:.3g}, "
          f"relative {max_diff / scale:.2g}); mean {float(diff.mean()):.3g}")  # fmt: skip
    real = []
    for i, ok in enumerate(agree):
        if ok:
            continue
        top2 = np.sort(a[i])[-2:]
        margin = float(top2[1] - top2[0])
        print(f"  step {i}: top-1 {ref['greedy'][i]} vs {top1[i]}, reference margin {margin:.3g}")
        if margin > 2 * max_diff:
            real.append(i)
    if real:
        print(f"  disagreements beyond a near tie at steps {real}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["model"] and len(argv) == 3:
        write_model(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["run"] and len(argv) in (4, 6) and (len(argv) == 4 or argv[4] == "--force"):
        run(argv[1], argv[2], Path(argv[3]), Path(argv[5]) if len(argv) == 6 else None)
        return 0
    if argv[:1] == ["compare"] and len(argv) == 3:
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
