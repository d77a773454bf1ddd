"""The steering library's store and files, without a server: content ids, concurrent writers (threads and processes),
writes interrupted by a crash (a process killed between the temp write and the rename, or at random), leftovers, and
control-vector GGUFs written by the `gguf` package in llama.cpp's layout (as repeng's `export_gguf` writes them)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_gguf
from safetensors.torch import save

from functok_vllm.core.vector import Vector, VectorError, decode_payloads, encode_payloads
from functok_vllm.library.files import FileError, read_vector_file
from functok_vllm.library.store import BadName, Conflict, Library, LibraryLimits, LimitReached, NotFound, StoreError

D = 16
ROOT = Path(__file__).resolve().parents[1]


def vec(seed: int, hooks=("blocks.1.hook_resid_post",)) -> Vector:
    g = torch.Generator().manual_seed(seed)
    return Vector.make({h: torch.randn(D, generator=g) for h in hooks})


def consistent(root: Path) -> dict:
    """Open the library as a new process would and check that every named vector's content is there and verifies."""
    lib = Library(root, D)
    for name, rec in lib.vectors().items():
        assert lib.content(rec["version"]).id == rec["version"], name
    return lib.vectors()


def test_content_ids_name_exactly_the_numbers_and_the_tensor():
    a = vec(0)
    assert vec(0).id == a.id and vec(1).id != a.id
    t = a.directions["blocks.1.hook_resid_post"].clone()
    t[3] = torch.nextafter(t[3], torch.tensor(1e9))  # one ulp
    assert Vector.make({"blocks.1.hook_resid_post": t}).id != a.id
    same_tensor = Vector.make({"blocks.2.hook_resid_pre": a.directions["blocks.1.hook_resid_post"]})
    assert same_tensor.id == a.id and list(same_tensor.directions) == ["blocks.1.hook_resid_post"]
    assert Vector.from_bytes(a.to_bytes(), a.id).id == a.id
    assert decode_payloads(encode_payloads([a]))[a.id].id == a.id
    forged = json.loads(encode_payloads([vec(1)]))
    with pytest.raises(VectorError, match="hashes to"):
        decode_payloads({a.id: next(iter(forged.values()))})
    for bad, why in [({}, "at one layer"), ({"blocks.1.hook_resid_post": torch.tensor([1.0, float("nan")])}, "NaN")]:
        with pytest.raises(VectorError, match=why):
            Vector.make(bad)


def test_changes_persist_and_are_refused_with_reasons(tmp_path):
    lib = Library(tmp_path, D, LibraryLimits(max_vectors=2, max_presets=1), writer=True)
    rec, new = lib.put_vector("calm", vec(0), {"kind": "directions"})
    assert new and rec["version"] == vec(0).id
    with pytest.raises(Conflict, match="exists already"):
        lib.put_vector("calm", vec(1), {})
    assert lib.put_vector("calm", vec(1), {}, replace=True)[0]["created"] == rec["created"]
    for name in ("bad name", "-x", "a" * 65, "é"):
        with pytest.raises(BadName, match="1-64 characters: letters, digits"):
            lib.put_vector(name, vec(0), {})
    lib.put_vector("other", vec(2), {})
    with pytest.raises(LimitReached, match="--max-vectors"):
        lib.put_vector("third", vec(3), {})
    lib.put_preset("p", {"edits": [{"vector": "calm", "strength": 1.0}]})
    with pytest.raises(Conflict, match="used by presets p"):
        lib.delete_vector("calm")
    with pytest.raises(Conflict, match="not in the library: nope"):
        lib.put_preset("p", {"edits": [{"vector": "nope", "strength": 1.0}]}, replace=True)
    again = Library(tmp_path, D)  # another process's view
    assert again.resolve("calm").id == vec(1).id and set(again.presets()) == {"p"}
    with pytest.raises(LookupError, match="is at version"):
        again.resolve("calm", vec(0).id)
    lib.delete_preset("p")
    lib.delete_vector("calm")
    with pytest.raises(NotFound):
        lib.delete_vector("calm")
    assert set(Library(tmp_path, D).vectors()) == {"other"}
    with pytest.raises(StoreError, match="holds vectors for d_model 16, the model.s is 32"):
        Library(tmp_path, 32)


def test_concurrent_writers_never_lose_or_corrupt(tmp_path):
    lib = Library(tmp_path, D, LibraryLimits(max_vectors=1000), writer=True)
    errors = []

    def writer(t):
        try:
            mine = Library(tmp_path, D, LibraryLimits(max_vectors=1000))
            for i in range(8):
                mine.put_vector(f"t{t}-{i}", vec(100 * t + i), {})
                mine.put_vector("shared", vec(1000 + 10 * t + i), {}, replace=True)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from functok_vllm.core.vector import Vector
        from functok_vllm.library.store import Library, LibraryLimits
        lib = Library({str(tmp_path)!r}, {D}, LibraryLimits(max_vectors=1000))
        p = int(sys.argv[1])
        for i in range(8):
            g = torch.Generator().manual_seed(5000 + 10 * p + i)
            one = lambda: Vector.make({{"blocks.1.hook_resid_post": torch.randn({D}, generator=g)}})
            lib.put_vector(f"p{{p}}-{{i}}", one(), {{}})
            lib.put_vector("shared", one(), {{}}, replace=True)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p)]) for p in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0] and errors == []
    names = consistent(tmp_path)
    assert set(names) == {f"t{t}-{i}" for t in range(6) for i in range(8)} | {
        f"p{p}-{i}" for p in range(3) for i in range(8)
    } | {"shared"}
    assert json.loads((tmp_path / "library.json").read_text())["generation"] == 6 * 16 + 3 * 16
    assert lib.resolve("shared").id == names["shared"]["version"]


def crash(root: Path, before: str, name: str, seed: int) -> int:
    """Run one `put_vector` in a child process that dies (os._exit) right before renaming the temp file of `before`
    (the object or the index) into place; its exit status."""
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from functok_vllm.core.vector import Vector
        from functok_vllm.library.store import Library
        real = os.replace
        def replace(src, dst):
            if os.path.basename(str(dst)).endswith({before!r}):
                os._exit(9)  # the temp file is written and fsynced; the rename never happens
            real(src, dst)
        os.replace = replace
        g = torch.Generator().manual_seed({seed})
        v = Vector.make({{"blocks.1.hook_resid_post": torch.randn({D}, generator=g)}})
        Library({str(root)!r}, {D}).put_vector({name!r}, v, {{}}, replace=True)
        """
    )
    return subprocess.run([sys.executable, "-c", script]).returncode


def test_a_write_interrupted_before_its_rename_leaves_the_old_state(tmp_path):
    lib = Library(tmp_path, D, writer=True)
    lib.put_vector("calm", vec(0), {})
    before = (tmp_path / "library.json").read_bytes()
    assert crash(tmp_path, "library.json", "calm", 7) == 9  # the new object landed, the index did not
    assert crash(tmp_path, ".safetensors", "fresh", 8) == 9  # died before the object's rename
    assert (tmp_path / "library.json").read_bytes() == before
    assert Library(tmp_path, D).resolve("calm").id == vec(0).id and "fresh" not in consistent(tmp_path)
    leftovers = list((tmp_path / "tmp").iterdir())
    assert len(leftovers) == 2  # the two temp files the dead writers left
    (tmp_path / "tmp" / "library.json.123.truncated").write_bytes(b'{"format": 1, "vec')  # and a truncated one
    assert len(list((tmp_path / "objects").iterdir())) == 2  # calm's and the orphan of the first crash
    Library(tmp_path, D, writer=True)  # a serving process starts: leftovers go, the state stays
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [f.name for f in (tmp_path / "objects").iterdir()] == [f"{vec(0).id}.safetensors"]
    assert consistent(tmp_path)["calm"]["version"] == vec(0).id


def test_a_writer_killed_at_random_times_never_corrupts_the_store(tmp_path):
    Library(tmp_path, 4096, writer=True).put_vector(
        "v", Vector.make({"blocks.1.hook_resid_post": torch.ones(4096)}), {}
    )
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from functok_vllm.core.vector import Vector
        from functok_vllm.library.store import Library
        lib = Library({str(tmp_path)!r}, 4096)
        print("ready", flush=True)
        for i in range(100000):
            g = torch.Generator().manual_seed(i)
            big = {{f"blocks.{{n}}.hook_resid_post": torch.randn(4096, generator=g) for n in range(8)}}
            lib.put_vector("v" if i % 2 else f"n{{i % 50}}", Vector.make(big), {{}}, replace=True)
        """
    )
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "ready\n"
        time.sleep(float(rng.uniform(0.05, 0.6)))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        lib = Library(tmp_path, None)
        for name, rec in lib.vectors().items():  # every state a reader can see is whole
            assert lib.content(rec["version"]).id == rec["version"], name
        seen.add(json.loads((tmp_path / "library.json").read_text())["generation"])
    assert len(seen) >= 2  # the writer made progress between kills


# ---- files -------------------------------------------------------------------------------------------------------


def test_control_vector_gguf_maps_direction_n_to_the_output_of_block_n(tmp_path):
    rng = np.random.default_rng(0)
    d = {1: rng.standard_normal(D).astype(np.float32), 3: rng.standard_normal(D).astype(np.float32)}
    out, meta = read_vector_file(write_gguf(tmp_path / "cv.gguf", d), D)
    assert meta == {"format": "gguf", "model_hint": "llama", "layer_count": 2}
    assert {k: v.tolist() for k, v in out.items()} == {
        "blocks.1.hook_resid_post": d[1].tolist(),
        "blocks.3.hook_resid_post": d[3].tolist(),
    }
    half = read_vector_file(write_gguf(tmp_path / "h.gguf", {2: d[1].astype(np.float16)}), D)[0]
    assert torch.equal(half["blocks.2.hook_resid_post"], torch.from_numpy(d[1].astype(np.float16).astype(np.float32)))
    bad = [
        (
            write_gguf(tmp_path / "m.gguf", {1: d[1]}, arch="llama"),
            "general.architecture is 'llama', not 'controlvector'",
        ),
        (write_gguf(tmp_path / "w.gguf", {1: d[1][:8]}), "direction.1 has 8 values; this model's d_model is 16"),
        (write_gguf(tmp_path / "z.gguf", {0: d[1]}), "direction.0: llama.cpp numbers control-vector layers from 1"),
        (write_gguf(tmp_path / "n.gguf", {1: np.full(D, np.inf, np.float32)}), "direction.1 holds NaN or Inf"),
        (b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40, "declares 18446744073709551615 metadata fields"),
        (b"PK\x03\x04 a zip", "neither a GGUF control vector nor a safetensors file"),
    ]
    for data, why in bad:
        with pytest.raises(FileError) as e:
            read_vector_file(data, D)
        assert why in str(e.value)


def test_safetensors_directions_by_llama_cpp_index_or_hook_name():
    a, b = torch.randn(D), torch.randn(D)
    out = read_vector_file(save({"direction.0": a, "blocks.3.hook_resid_pre": b}), D)[0]
    assert set(out) == {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}
    assert read_vector_file(vec(4, ("blocks.2.hook_mlp_out",)).to_bytes(), D)[0].keys() == {"blocks.2.hook_mlp_out"}
    for tensors, why in [
        ({"layer_1": a}, "name a direction direction.N"),
        ({"direction.1": torch.zeros(D, D)}, "a direction is 1-D"),
        ({"direction.1": torch.arange(D)}, "holds floats"),
        ({"direction.1": a, "blocks.2.hook_resid_pre": b}, "a second direction at blocks.1.hook_resid_post"),
    ]:
        with pytest.raises(FileError, match=why):
            read_vector_file(save(tensors), D)
