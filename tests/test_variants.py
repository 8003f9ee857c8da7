"""Every CPU variant, checked where it runs: quantized decodes in a child per variant, a variant
that crashes worked around (install, doctor), the AMX fix in the binary, ggml's scores."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import _artifacts as art
import pytest

from nexabind import _source, cache, pin, targets
from nexabind._archive import safe_extract
from nexabind._install_record import INSTALL_RECORD
from nexabind.install import install_archive
from nexabind.platform import cpu_flags, target

# A CPU module that ggml scores above every real variant and that dies of SIGILL (ud2) when
# ggml initializes it: what an unpatched AMX variant did on Sapphire Rapids, but on any CPU.
POISON_C = r"""
int ggml_backend_score(void) { return 1 << 20; }
void *ggml_backend_init(void) { __builtin_trap(); return 0; }
"""
POISON = "libggml-cpu-zzpoison.so"


def _nexabind(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "nexabind", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )  # fmt: skip


def _poisoned_copy(libdir: Path, dest: Path) -> Path:
    """``dest/lib``: a copy of ``libdir`` plus the poisoned variant, and an install record."""
    lib = dest / "lib"
    shutil.copytree(libdir, lib, symlinks=True)
    for name in ("abi.json", "build-info.json"):
        if (libdir.parent / name).is_file():
            shutil.copy(libdir.parent / name, dest / name)
    src = dest / "poison.c"
    src.write_text(POISON_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", str(src), "-o", str(lib / POISON)], check=True)
    (dest / INSTALL_RECORD).write_text(json.dumps({"release": pin.RELEASE}) + "\n")
    return lib


def test_ggml_scores_match_the_variant_table_for_this_cpu(libdir: Path) -> None:
    """What `nexabind build` predicts from /proc/cpuinfo is what ggml's own code says here."""
    from nexabind import _variants

    flags = cpu_flags()
    if flags is None or target()[1] != "x86_64":
        pytest.skip("the variant table is for Linux x86_64")
    ggml = {v: s for v, s in _variants.scores(libdir).items() if s > 0}
    assert ggml == targets.cpu_variant_scores("x86_64", flags)
    assert list(ggml)[-1] == "x64"


def test_doctor_all_variants_decodes_every_weight_type_with_every_variant(libdir: Path) -> None:
    from nexabind import _variants
    from nexabind.tinymodel import DTYPES

    r = _nexabind("doctor", "--lib-path", str(libdir), "--all-variants", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    rows = json.loads(r.stdout)
    runnable = [v for v, s in _variants.scores(libdir).items() if s > 0]
    assert sorted(row["variant"] for row in rows) == sorted(runnable)
    assert rows[0]["variant"] == "x64"
    for row in rows:
        assert row["ok"] and row["error"] is None, row
        assert set(row["verdicts"]) == set(DTYPES) - {"f16"}
        for verdict in row["verdicts"].values():
            assert verdict in ("baseline", "agrees") or verdict.startswith("near tie"), row


def test_doctor_decodes_quantized_models_and_names_the_variant(libdir: Path) -> None:
    r = _nexabind("doctor", "--lib-path", str(libdir))
    assert r.returncode == 0, r.stderr
    for dtype in ("f32", "q4_0", "q8_0"):
        assert re.search(rf"decoded: +{dtype} +\[\d+(, \d+){{7}}\]", r.stdout), r.stdout
    variant = re.search(r"CPU variant: (\S+)", r.stdout)
    assert variant and variant.group(1) != "None"


def test_doctor_works_around_a_variant_that_dies_and_records_the_choice(
    libdir: Path, tmp_path: Path
) -> None:
    lib = _poisoned_copy(libdir, tmp_path / "entry")
    # Loaded directly, the poisoned variant wins ggml's scoring and kills the process.
    crash = _nexabind("doctor", "--lib-path", str(lib), env={"NEXABIND_CPU_VARIANT": "zzpoison"})
    assert crash.returncode == 1
    assert "CPU variant zzpoison (from NEXABIND_CPU_VARIANT) died of SIGILL" in crash.stderr
    r = _nexabind("doctor", "--lib-path", str(lib))
    assert r.returncode == 0, r.stderr
    assert "skipped:     CPU variant zzpoison: died of SIGILL (Illegal instruction)" in r.stdout
    record = json.loads((lib.parent / INSTALL_RECORD).read_text())
    best = next(v for v in targets.cpu_variant_scores("x86_64", cpu_flags() or set()))
    assert record["cpu_variant"] == best
    assert record["cpu_variants_skipped"] == {"zzpoison": "died of SIGILL (Illegal instruction)"}
    # From then on the loader loads only the recorded variant: Llama works in a new process.
    code = (
        "import sys; from nexabind import Llama, loader; "
        "llm = Llama(sys.argv[1], lib_path=sys.argv[2], n_ctx=128, verbose=False); "
        "llm.create_completion('Hello', max_tokens=4, temperature=0); "
        "print(loader.loaded_cpu_variant())"
    )
    model = tmp_path / "q4_0.gguf"
    subprocess.run(
        [sys.executable, "-m", "nexabind._selfcheck", "decode", str(lib), str(tmp_path), "q4_0"],
        check=True, capture_output=True, env={"NEXABIND_CPU_VARIANT": best, "PATH": "/usr/bin"},
    )  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, str(model), str(lib)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == best
    again = _nexabind("doctor", "--lib-path", str(lib))
    assert "skipped:     CPU variant zzpoison" in again.stdout and again.returncode == 0


def test_install_records_the_best_variant_that_decodes(
    release_mirror: Path, tmp_path: Path, libdir: Path, _isolated_cache: Path, monkeypatch
) -> None:
    tree = tmp_path / "tree"
    safe_extract(art.archive(release_mirror), tree)
    _poisoned_copy(tree / "lib", tmp_path / "poisoned")
    shutil.copy(tmp_path / "poisoned" / "lib" / POISON, tree / "lib" / POISON)
    poisoned = tmp_path / "poisoned.tar.gz"
    with tarfile.open(poisoned, "w:gz") as tar:
        for p in sorted(tree.rglob("*")):
            tar.add(p, p.relative_to(tree).as_posix(), recursive=False)
    entry = {**art.entry(release_mirror), "sha256": cache.sha256_file(poisoned)}
    lib = install_archive(poisoned, entry, pin.RELEASE)
    record = json.loads((lib.parent / INSTALL_RECORD).read_text())
    assert record["cpu_variant"] == next(
        iter(targets.cpu_variant_scores("x86_64", cpu_flags() or set()))
    )
    assert record["cpu_variants_skipped"] == {"zzpoison": "died of SIGILL (Illegal instruction)"}
    assert record["cpu_variant_checked"] == record["cpu_variant"]
    from nexabind.info import gather, render

    monkeypatch.delenv("NEXABIND_LIB_PATH", raising=False)
    text = render(gather())
    assert f"loads {record['cpu_variant']} (the install record" in text
    assert "skipped:      zzpoison: died of SIGILL (Illegal instruction)" in text


def test_an_unknown_or_unrunnable_cpu_variant_is_a_clear_error(libdir: Path) -> None:
    r = _nexabind("doctor", "--lib-path", str(libdir), "--cpu-variant", "pentium")
    assert r.returncode == 1
    assert "CPU variant 'pentium' (from NEXABIND_CPU_VARIANT) is not in" in r.stderr
    assert "x64" in r.stderr
    flags = cpu_flags() or set()
    unrunnable = [
        v for v in targets.X86_CPU_VARIANTS if v not in targets.cpu_variant_scores("x86_64", flags)
    ]
    if not unrunnable or not (libdir / f"libggml-cpu-{unrunnable[0]}.so").exists():
        pytest.skip("this CPU runs every variant of the build")
    r = _nexabind("doctor", "--lib-path", str(libdir), "--cpu-variant", unrunnable[0])
    assert r.returncode == 1
    assert f"CPU variant {unrunnable[0]!r} (from NEXABIND_CPU_VARIANT) does not run" in r.stderr


def test_the_amx_tile_config_is_whole_in_the_sapphirerapids_binary(libdir: Path) -> None:
    """The patch: every ldtilecfg loads a config from .rodata with palette 1 and the rows and
    column bytes of the 2-2-4 tile layout (unpatched, GCC loaded one from the stack with only
    the palette set: SIGILL at the first tileloadd)."""
    so = libdir / "libggml-cpu-sapphirerapids.so"
    if not so.exists() or shutil.which("objdump") is None:
        pytest.skip("no sapphirerapids variant (x86_64 Linux build) or no objdump")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    loads = [line for line in dis.splitlines() if "ldtilecfg" in line]
    assert loads, "no ldtilecfg in the AMX variant"
    for line in loads:
        m = re.search(r"ldtilecfg 0x[0-9a-f]+\(%rip\)\s+# ([0-9a-f]+) <[^>]*tile_config", line)
        assert m, f"a tile config not in static storage: {line.strip()}"
        addr = int(m.group(1), 16)
        dump = subprocess.run(
            ["objdump", "-s", f"--start-address={addr}", f"--stop-address={addr + 64}", str(so)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        hexes = "".join(
            "".join(line.split()[1:5])
            for line in dump.splitlines()
            if re.match(r" [0-9a-f]+ ", line)
        )
        cfg = bytes.fromhex(hexes)
        assert cfg[0] == 1  # palette
        colsb = [int.from_bytes(cfg[16 + 2 * i : 18 + 2 * i], "little") for i in range(8)]
        assert colsb == [64, 64, 32, 32, 64, 64, 64, 64]
        assert list(cfg[48:56]) == [8, 8, 16, 16, 16, 16, 16, 16]


def test_builds_record_the_patches_they_carry(libdir: Path) -> None:
    info = json.loads((libdir.parent / "build-info.json").read_text())
    assert info["patches"] == _source.patches()
    assert [p["file"] for p in info["patches"]] == [
        "0001-amx-tile-config-static-storage.patch",
        "0002-ggml-cpu-variants-subset.patch",
    ]
    assert pin.RELEASE.endswith("-r2")


@pytest.mark.parametrize("dtype", ["q4_0", "q4_k", "q8_0", "iq4_nl"])
def test_quantized_kernels_agree_across_batch_shapes(
    libdir: Path, tmp_path: Path, dtype: str
) -> None:
    """One token at a time (the one-row kernels), ubatches of 8 and 33, and one batch of 100
    (REPACK's gemm past 32 rows) give the same logits, within 1% of their range (each path
    quantizes the activations its own way), and the same greedy continuation."""
    import numpy as np

    from nexabind import lowlevel
    from nexabind.tinymodel import ModelSpec, write_random_model

    lowlevel.lib(libdir)
    path = write_random_model(tmp_path / f"{dtype}.gguf", ModelSpec(dtype=dtype, seed=9))
    prompt = [3 + (i * 11) % 256 for i in range(100)]

    def run(n_batch: int, n_ubatch: int) -> tuple[np.ndarray, list[int]]:
        with (
            lowlevel.Model(path) as model,
            lowlevel.Context(model, n_ctx=256, n_batch=n_batch, n_ubatch=n_ubatch) as ctx,
        ):
            for start in range(0, len(prompt), n_batch):
                ctx.batch.set(prompt[start : start + n_batch], start)
                ctx.decode()
            logits = np.array(ctx.logits(-1))
            out, pos = [], len(prompt)
            for _ in range(8):
                tok = int(np.argmax(ctx.logits(-1)))
                out.append(tok)
                ctx.batch.set_one(tok, pos)
                pos += 1
                ctx.decode()
        return logits, out

    base, tokens = run(100, 100)
    for n_batch, n_ubatch in ((1, 1), (16, 8), (100, 33)):
        logits, got = run(n_batch, n_ubatch)
        scale = float(np.abs(base).max())
        assert float(np.abs(logits - base).max()) < 1e-2 * scale, (n_batch, n_ubatch)
        assert got == tokens, (n_batch, n_ubatch)


def test_quantize_refuses_what_it_cannot_read(libdir: Path, tmp_path: Path) -> None:
    """Junk, a missing file, a width the blocks do not fit: errors that say so, in a child
    process so that a crash would show as a signal."""
    from _child import run_child

    code = """
        import sys
        from nexabind import lowlevel
        from nexabind.tinymodel import ModelSpec
        lowlevel.lib()
        junk = sys.argv[1] + "/junk.gguf"
        open(junk, "wb").write(b"GGUF" + bytes(range(256)) * 4)
        for src, dtype in ((junk, "q4_0"), (sys.argv[1] + "/none.gguf", "q8_0"), (junk, "q3_x")):
            try:
                lowlevel.quantize(src, sys.argv[1] + "/out.gguf", dtype)
            except (ValueError, OSError) as e:
                print(type(e).__name__, "|", e)
        try:
            ModelSpec(dtype="q4_k", n_embd=64)
        except ValueError as e:
            print(type(e).__name__, "|", e)
    """
    r = run_child(code, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4, r.stdout
    assert lines[0].startswith("ModelLoadError |") and "junk.gguf" in lines[0]
    assert lines[1] == f"ModelLoadError | no model file at {tmp_path}/none.gguf"
    assert lines[2].startswith("ValueError | dtype must be one of")
    assert "q4_k needs n_embd and n_ff that are multiples of 256" in lines[3]
