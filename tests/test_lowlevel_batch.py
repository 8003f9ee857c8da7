"""``Batch``: what each way of filling it puts in the arrays llama.cpp reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def _rows(batch: Any) -> list[tuple[int, int, int, int]]:
    b = batch.b
    return [(b.token[i], b.pos[i], b.seq_id[i][0], b.logits[i]) for i in range(batch.n_tokens)]


@pytest.mark.parametrize(
    "tokens",
    [
        [5, 6, 7],
        (5, 6, 7),
        array("i", [5, 6, 7]),
        np.array([5, 6, 7], dtype=np.int32),
        np.array([5, 6, 7], dtype=np.int64),  # converted, not reinterpreted
        memoryview(array("i", [0, 5, 6, 7]))[1:],
    ],
    ids=["list", "tuple", "array", "int32", "int64", "memoryview"],
)
def test_append_writes_tokens_positions_sequences_and_logits(ll: Any, tokens: Any) -> None:
    batch = ll.Batch(8)
    assert batch.append(tokens, 10, seq_id=2) == 2
    assert batch.append([1, 2], 40, seq_id=3, logits_last=False) == 4
    assert _rows(batch) == [
        (5, 10, 2, 0),
        (6, 11, 2, 0),
        (7, 12, 2, 1),
        (1, 40, 3, 0),
        (2, 41, 3, 0),
    ]
    assert [batch.b.n_seq_id[i] for i in range(8)] == [1] * 8
    # The numpy views see the same memory.
    assert batch.tokens[:5].tolist() == [5, 6, 7, 1, 2]
    assert batch.logits[:5].tolist() == [0, 0, 1, 0, 0]


def test_set_replaces_and_can_ask_logits_for_every_token(ll: Any) -> None:
    batch = ll.Batch(4)
    batch.set([1, 2, 3, 4], 0, seq_id=1)
    batch.set([7, 8], 5, logits_last=False)
    assert _rows(batch) == [(7, 5, 0, 1), (8, 6, 0, 1)]
    batch.set_one(9, 3, seq_id=2)
    assert _rows(batch) == [(9, 3, 2, 1)]


def test_what_does_not_fit_is_refused_and_nothing_is_written(ll: Any) -> None:
    batch = ll.Batch(3)
    batch.append([1, 2], 0)
    with pytest.raises(ValueError, match="cannot take 2 tokens after 2"):
        batch.append([3, 4], 2)
    with pytest.raises(ValueError, match="cannot take no tokens"):
        batch.append([], 2)
    assert _rows(batch) == [(1, 0, 0, 0), (2, 1, 0, 1)]
    batch.close()
    with pytest.raises(ValueError, match="closed"):
        batch.append([1], 0)
    with pytest.raises(ValueError, match="batch capacity must be >= 1"):
        ll.Batch(0)


def test_a_first_llama_does_not_import_numpy(libdir: Path, tiny_model: Path) -> None:
    # numpy's import is most of the Python time of a first Llama(...); it waits until a call
    # needs it.
    code = (
        "import json, sys; from nexabind import Llama; "
        "llm = Llama(sys.argv[1], n_ctx=256, verbose=False); "
        "ids = llm.tokenize(b'Hello'); "
        "print(json.dumps(['numpy' in sys.modules, len(ids)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NEXABIND_LIB_PATH": str(libdir)},
    ).stdout
    numpy_loaded, n = json.loads(out.strip().splitlines()[-1])
    assert n > 0
    assert not numpy_loaded
