"""``quests-torch compress`` and ``quests-torch generations`` through the real entry point."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import DATA, cli

import quests_torch as qt
from quests_torch.compression import compress, generation_report


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The 40 compression-reference structures with EMT energies/forces, and the prior set."""
    d = tmp_path_factory.mktemp("compress")
    frames = ase.io.read(DATA / "compression_structures.extxyz", ":")
    dataset, prior = frames[:40], frames[40:]
    for atoms in dataset:
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        atoms.info["gen"] = int(atoms.info["frame"]) // 10
    ase.io.write(d / "data.extxyz", dataset, format="extxyz")
    ase.io.write(d / "prior.extxyz", prior, format="extxyz")
    for g in range(4):
        ase.io.write(d / f"gen{g}.extxyz", dataset[10 * g : 10 * g + 10], format="extxyz")
    data = ase.io.read(d / "data.extxyz", ":")
    return d, data, ase.io.read(d / "prior.extxyz", ":")


def _library(frames, size, method, **kw):
    x = qt.get_descriptors(frames)
    counts = torch.tensor([len(a) for a in frames])
    sid = torch.repeat_interleave(torch.arange(len(frames)), counts)
    return compress(x, sid, size, method, **kw)


def test_compress_writes_structures_json_and_plot(files):
    d, data, _ = files
    proc = cli(
        "compress", "data.extxyz", "-m", "msc", "-s", "0.3",
        "-o", "sel.extxyz", "-o", "sel.json", "--plot", "fig", cwd=d,
    )  # fmt: skip
    assert "msc: selected 12 of 40 structures" in proc.stdout
    lib = _library(data, 0.3, "msc")
    res = json.loads((d / "sel.json").read_text())
    assert res["results"]["indices"] == lib.indices.tolist()
    assert res["results"]["summary"]["entropy"] == pytest.approx(
        float(lib.curve.entropy[-1]), rel=1e-12
    )
    assert len(res["results"]["curve"]["entropy"]) == 12
    assert res["parameters"]["method"] == "msc" and res["parameters"]["size"] == 0.3
    assert (d / "fig-compression.png").stat().st_size > 1000
    chosen = ase.io.read(d / "sel.extxyz", ":")
    assert [a.info["quests_source_index"] for a in chosen] == lib.indices.tolist()
    assert [a.info["quests_selection_rank"] for a in chosen] == list(range(12))
    for a in chosen:  # original info, arrays, energies and forces survive
        src = data[a.info["quests_source_index"]]
        assert a.info["frame"] == src.info["frame"] and a.info["gen"] == src.info["gen"]
        np.testing.assert_array_equal(a.arrays["tag_id"], src.arrays["tag_id"])
        np.testing.assert_allclose(a.positions, src.positions, atol=1e-8)
        assert a.get_potential_energy() == pytest.approx(src.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(a.get_forces(), src.get_forces(), atol=1e-6)


def test_compress_count_conditional_and_descriptor_input(files):
    d, data, prior = files
    cli(
        "compress", "data.extxyz", "-m", "msc_conditional", "-r", "prior.extxyz", "-s", "7",
        "-o", "cond.json", "-q", cwd=d,
    )  # fmt: skip
    lib = _library(data, 7, "msc_conditional", reference=qt.get_descriptors(prior))
    assert json.loads((d / "cond.json").read_text())["results"]["indices"] == lib.indices.tolist()
    cli("descriptors", "data.extxyz", "-o", "data.npz", "-q", cwd=d)
    cli("compress", "data.npz", "-m", "fps", "-s", "5", "-o", "fps.json", "-q", cwd=d)
    lib = _library(data, 5, "fps")
    assert json.loads((d / "fps.json").read_text())["results"]["indices"] == lib.indices.tolist()
    cli("compress", "data.extxyz", "-m", "k_means", "-s", "5", "--seed", "4", "-o", "k.json",
        "-q", cwd=d)  # fmt: skip
    lib = _library(data, 5, "k_means", generator=4)
    assert json.loads((d / "k.json").read_text())["results"]["indices"] == lib.indices.tolist()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "0"], "-s 0: data.extxyz has 40 structures"),
        (["-s", "41"], "-s 41: data.extxyz has 40 structures"),
        (["-s", "1.5"], "a fraction must be in (0, 1]"),
        (["-m", "msc_conditional"], "needs -r/--reference"),
        (["-m", "msc", "-r", "prior.extxyz"], "'msc_conditional' only"),
        (["-o", "out.csv"], "write .extxyz/.xyz (structures) or .json"),
        (["-m", "msc_conditional", "-r", "prior16.npz"], "-k 32 differs from k=16"),
    ],
)
def test_compress_errors(files, args, message):
    d, _, _ = files
    if not (d / "prior16.npz").exists():
        cli("descriptors", "prior.extxyz", "-k", "16", "-o", "prior16.npz", "-q", cwd=d)
    extra = ["-k", "32"] if "prior16.npz" in args else []
    proc = cli("compress", "data.extxyz", *args, *extra, cwd=d, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_compress_descriptor_file_cannot_write_structures(files):
    d, _, _ = files
    cli("descriptors", "data.extxyz", "-o", "d2.npz", "-q", cwd=d)
    proc = cli("compress", "d2.npz", "-o", "x.extxyz", cwd=d, check=False)
    assert proc.returncode == 2 and "writing structures needs the structures" in proc.stderr


def test_generations_from_files_and_info_key(files):
    d, data, _ = files
    proc = cli(
        "generations", "gen0.extxyz", "gen1.extxyz", "gen2.extxyz", "gen3.extxyz",
        "-o", "gens.json", "--plot", "g", cwd=d,
    )  # fmt: skip
    assert "4 generations, 1270 environments" in proc.stdout
    rows = json.loads((d / "gens.json").read_text())["results"]["generations"]
    assert [r["generation"] for r in rows] == ["gen0", "gen1", "gen2", "gen3"]
    x = qt.get_descriptors(data)
    counts = torch.tensor([len(a) for a in data])
    gen = torch.repeat_interleave(torch.arange(40) // 10, counts)
    lib = generation_report(x, gen).rows()
    for got, want in zip(rows, lib, strict=True):
        assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-12)
        assert got["novelty"] == want["novelty"]
        assert got["cumulative_environments"] == want["cumulative_environments"]
    assert rows[0]["novelty"] is None
    assert (d / "g-generations.png").stat().st_size > 1000
    cli("generations", "data.extxyz", "--key", "gen", "-o", "key.json", "-q", cwd=d)
    rows_key = json.loads((d / "key.json").read_text())["results"]["generations"]
    assert [r["generation"] for r in rows_key] == [0, 1, 2, 3]
    assert [r["entropy"] for r in rows_key] == pytest.approx([r["entropy"] for r in rows])
    proc = cli("generations", "data.extxyz", "--key", "nope", cwd=d, check=False)
    assert proc.returncode == 2 and "no info key 'nope'" in proc.stderr
    proc = cli("generations", "data.extxyz", cwd=d, check=False)
    assert proc.returncode == 2 and "one file per generation" in proc.stderr


def test_compress_checkpoint_resumes_and_extends(files):
    d, data, _ = files
    cli("compress", "data.extxyz", "-s", "5", "--checkpoint", "c.ckpt", "-o", "c5.json", "-q",
        cwd=d)  # fmt: skip
    assert (d / "c.ckpt").exists()
    cli("compress", "data.extxyz", "-s", "9", "--checkpoint", "c.ckpt", "-o", "c9.json", "-q",
        cwd=d)  # fmt: skip
    lib = _library(data, 9, "msc")
    assert json.loads((d / "c9.json").read_text())["results"]["indices"] == lib.indices.tolist()
    proc = cli("compress", "data.extxyz", "-s", "9", "-b", "0.02", "--checkpoint", "c.ckpt",
               cwd=d, check=False)  # fmt: skip
    assert proc.returncode == 2 and "written for other data or parameters" in proc.stderr
