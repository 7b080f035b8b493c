"""The native trajectory readers (issue 27, item 2) against ASE: LAMMPS dump text, torch-sim
HDF5 trajectories and ASE ``.traj``, on corpora of variants written into ``tmp_path``.

Each reader must give the frames ASE gives (numbers, positions, cell and pbc equal bit for
bit: both parse decimal text with a correctly rounded parser, so no tolerance is needed) and
therefore the same descriptors, compared exactly (``torch.equal``).
"""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch

import quests_torch as qt
from quests_torch import io
from quests_torch.readers import formats
from quests_torch.readers.lammps import parse_dump_frame, parse_types, scan_dump

# --- LAMMPS dump text: a corpus of variants ------------------------------------------------


def _box(rng, tilt: str, flags: str) -> tuple[str, np.ndarray, np.ndarray]:
    """An ``ITEM: BOX BOUNDS`` block in LAMMPS' bounds-with-tilt convention, the box's origin
    and its cell rows."""
    lo = rng.normal(size=3).round(6).tolist()
    length = (5.0 + rng.random(3)).round(6).tolist()
    if tilt == "none":
        rows = "".join(f"{lo[i]!r} {lo[i] + length[i]!r}\n" for i in range(3))
        return f"ITEM: BOX BOUNDS {flags}\n{rows}", np.array(lo), np.diag(length)
    if tilt == "abc":  # general triclinic: rows a, b, c and the origin
        cell = np.diag(length) + rng.normal(scale=0.4, size=(3, 3)).round(5)
        rows = "".join(" ".join(repr(float(v)) for v in [*cell[i], lo[i]]) + "\n" for i in range(3))
        return f"ITEM: BOX BOUNDS abc origin {flags}\n{rows}", np.array(lo), cell
    sign = 1.0 if tilt == "positive" else -1.0
    xy, xz, yz = (sign * rng.random(3)).round(5).tolist()
    xlo = lo[0] + min(0.0, xy, xz, xy + xz)
    xhi = lo[0] + length[0] + max(0.0, xy, xz, xy + xz)
    ylo, yhi = lo[1] + min(0.0, yz), lo[1] + length[1] + max(0.0, yz)
    rows = (
        f"{xlo!r} {xhi!r} {xy!r}\n{ylo!r} {yhi!r} {xz!r}\n{lo[2]!r} {lo[2] + length[2]!r} {yz!r}\n"
    )
    cell = np.array([[length[0], 0, 0], [xy, length[1], 0], [xz, yz, length[2]]])
    return f"ITEM: BOX BOUNDS xy xz yz {flags}\n{rows}", np.array(lo), cell


def _dump_frame(rng, step: int, n: int, columns: list[str], *, tilt="none", flags="pp pp pp",
                shuffle=True, extra_items="") -> str:  # fmt: skip
    """One dump frame: ``n`` atoms of types 1-3 (Cu, Zr, Al) with the given columns."""
    box, lo, cell = _box(rng, tilt, flags)
    frac = rng.random((n, 3))
    cart = frac @ cell + lo
    types = rng.integers(1, 4, n)
    symbols = np.array(["Cu", "Zr", "Al"])[types - 1]
    masses = np.array([63.546, 91.224, 26.9815])[types - 1]
    ids = rng.permutation(n) + 1 if shuffle else np.arange(1, n + 1)
    values = {"id": ids, "type": types, "element": symbols, "mass": masses, "q": rng.normal(size=n)}
    for i, axis in enumerate("xyz"):
        values[axis] = values[f"{axis}u"] = cart[:, i]
        values[f"{axis}s"] = values[f"{axis}su"] = frac[:, i]
        values[f"v{axis}"] = values[f"f{axis}"] = rng.normal(size=n)
    values["c_pe"] = values["v_energy"] = rng.normal(size=n)
    values["i_flag"] = rng.integers(0, 5, n)

    def text(name, i):
        v = values[name][i]
        return str(v) if name in ("id", "type", "element", "i_flag") else repr(float(v))

    rows = "".join(" ".join(text(c, i) for c in columns) + "\n" for i in range(n))
    header = f"ITEM: TIMESTEP\n{step}\nITEM: NUMBER OF ATOMS\n{n}\n{box}"
    return f"{extra_items}{header}ITEM: ATOMS {' '.join(columns)}\n{rows}"


#: name -> (keywords of _dump_frame, frames, atoms per frame)
DUMPS = {
    "id_type_xyz": ({"columns": ["id", "type", "x", "y", "z"]}, 3, [5, 5, 5]),
    "columns_reordered_extra": (
        {
            "columns": [
                "x",
                "vx",
                "type",
                "z",
                "c_pe",
                "id",
                "y",
                "fx",
                "fy",
                "fz",
                "v_energy",
                "i_flag",
                "q",
            ]
        },
        2,
        [6, 4],
    ),
    "scaled": ({"columns": ["id", "type", "xs", "ys", "zs"]}, 2, [7, 7]),
    "triclinic_positive": (
        {"columns": ["id", "type", "x", "y", "z"], "tilt": "positive"},
        2,
        [6, 6],
    ),
    "triclinic_negative_scaled_pp_ff_fs": (
        {"columns": ["type", "id", "xs", "ys", "zs"], "tilt": "negative", "flags": "pp ff fs"},
        2,
        [5, 8],
    ),
    "unwrapped_nonperiodic": (
        {"columns": ["id", "type", "xu", "yu", "zu"], "flags": "ff ff ff"},
        2,
        [4, 4],
    ),
    "scaled_unwrapped": (
        {"columns": ["id", "type", "xsu", "ysu", "zsu"], "flags": "pp pp ss"},
        1,
        [6],
    ),
    "no_id_file_order": ({"columns": ["type", "x", "y", "z"], "shuffle": False}, 2, [3, 5]),
    "element_column": ({"columns": ["id", "element", "type", "x", "y", "z"]}, 2, [5, 5]),
    "general_triclinic": ({"columns": ["id", "type", "x", "y", "z"], "tilt": "abc"}, 1, [6]),
    "units_and_time_items": (
        {"columns": ["id", "type", "x", "y", "z"], "extra_items": "ITEM: TIME\n0.25\n"},
        3,
        [4, 2, 4],
    ),
    "one_atom": ({"columns": ["id", "type", "x", "y", "z"]}, 2, [1, 1]),
}
SPECORDER = ["Cu", "Zr", "Al"]


def _write_dump(tmp_path, name: str, seed: int = 0, *, crlf: bool = False, last_newline=True):
    kw, frames, sizes = DUMPS[name]
    rng = np.random.default_rng(seed)
    text = "".join(_dump_frame(rng, 100 * i, sizes[i], **kw) for i in range(frames))
    if not last_newline:
        text = text.rstrip("\n")
    if crlf:
        text = text.replace("\n", "\r\n")
    path = tmp_path / f"{name}.lammpstrj"
    path.write_bytes(text.encode())
    return path


def _assert_same_frames(got: list, ref: list) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.numbers, r.numbers)
        assert g.positions.dtype == np.float64
        assert g.positions.tobytes() == np.asarray(r.positions, dtype=np.float64).tobytes()
        assert g.cell.array.tobytes() == np.asarray(r.cell.array, dtype=np.float64).tobytes()
        np.testing.assert_array_equal(g.pbc, r.pbc)


def _assert_same_descriptors(got: list, ref: list) -> None:
    a = qt.get_descriptors(got, k=8, cutoff=4.0, dtype=torch.float64)
    b = qt.get_descriptors(ref, k=8, cutoff=4.0, dtype=torch.float64)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(DUMPS))
def test_dump_reader_gives_the_frames_and_descriptors_ase_gives(tmp_path, name):
    path = _write_dump(tmp_path, name)
    got = list(io.iter_structures(path, types="Cu,Zr,Al"))
    ref = ase.io.read(path, ":", format="lammps-dump-text", specorder=SPECORDER)
    _assert_same_frames(got, ref)
    _assert_same_descriptors(got, ref)
    assert formats.count_frames(path) == len(ref) == io.count_frames(path)


@pytest.mark.parametrize("variant", ["crlf", "no_final_newline"])
def test_dump_reader_line_ending_variants(tmp_path, variant):
    path = _write_dump(
        tmp_path, "triclinic_positive", crlf=variant == "crlf",
        last_newline=variant != "no_final_newline",
    )  # fmt: skip
    got = list(io.iter_structures(path, types={1: "Cu", 2: "Zr", 3: "Al"}))
    _assert_same_frames(got, ase.io.read(path, ":", format="lammps-dump-text", specorder=SPECORDER))


def test_dump_elements_from_element_and_mass_columns_as_ase(tmp_path):
    path = _write_dump(tmp_path, "element_column")
    ref = ase.io.read(path, ":", format="lammps-dump-text")  # no specorder: the column
    _assert_same_frames(list(io.iter_structures(path)), ref)
    _assert_same_frames(list(io.iter_structures(path, types="Al,Al,Al")), ref)  # column wins
    rng = np.random.default_rng(5)
    masses = tmp_path / "masses.dump"
    masses.write_text(_dump_frame(rng, 0, 6, ["id", "type", "mass", "x", "y", "z"]))
    ref = ase.io.read(masses, ":", format="lammps-dump-text")  # elements by nearest mass
    _assert_same_frames(list(io.iter_structures(masses)), ref)
    # the one deliberate difference: with `types`, the map decides over the masses
    mapped = list(io.iter_structures(masses, types="Ni,Ni,Ni"))
    assert set(mapped[0].numbers.tolist()) == {28}
    assert set(ref[0].numbers.tolist()) <= {13, 29, 40}


@pytest.mark.parametrize("index", [":", "1:", "::2", "-1", "1"])
def test_dump_selection_and_reader_processes(tmp_path, index, monkeypatch):
    from functools import partial

    from quests_torch.readers import frame_index, select_frames
    from quests_torch.readers import pool as pool_module
    from quests_torch.readers.lammps import read_dump_frames

    monkeypatch.setattr(pool_module, "MIN_POOL_ATOMS", 0)
    path = _write_dump(tmp_path, "units_and_time_items")
    ref = ase.io.read(path, index, format="lammps-dump-text", specorder=SPECORDER)
    ref = ref if isinstance(ref, list) else [ref]
    for readers in (None, 0, 2):
        got = list(io.iter_structures(path, index, readers=readers, types="Cu,Zr,Al"))
        _assert_same_frames(got, ref)
    fi = frame_index(path, cache=False, scanner=scan_dump)
    read = partial(read_dump_frames, types={1: 29, 2: 40, 3: 13})
    with pool_module.ReaderPool(2, chunk_atoms=3) as pool:  # a chunk per frame or two
        records = pool.records(path, fi, select_frames(len(fi), index), read=read)
        _assert_same_frames([r.to_atoms() for r in records], ref)


def test_dump_frame_index_is_cached_per_format(tmp_path, monkeypatch):
    from quests_torch.readers import index as index_module

    monkeypatch.setenv("QUESTS_TORCH_CACHE", str(tmp_path / "cache"))
    path = _write_dump(tmp_path, "id_type_xyz")
    first = index_module.frame_index(path, scanner=scan_dump)
    assert first.n_atoms.tolist() == [5, 5, 5]
    entries = list((tmp_path / "cache" / "frame-index").glob("*.npz"))
    assert len(entries) == 1
    again = index_module.frame_index(path, scanner=scan_dump)
    assert again.starts.tolist() == first.starts.tolist()
    assert len(list((tmp_path / "cache" / "frame-index").glob("*.npz"))) == 1


@pytest.mark.parametrize("block", [16, 100, 1 << 20])
def test_dump_scan_at_any_block_size(tmp_path, block):
    path = _write_dump(tmp_path, "units_and_time_items")
    whole = scan_dump(path)
    cut = scan_dump(path, block=block)
    assert cut.starts.tolist() == whole.starts.tolist()
    assert cut.stops.tolist() == whole.stops.tolist() and cut.n_atoms.tolist() == [4, 2, 4]
    blob = path.read_bytes()
    assert all(blob[a:].startswith(b"ITEM: TIMESTEP") for a in whole.starts.tolist())


def test_dump_errors_name_the_file_and_the_problem(tmp_path):
    path = _write_dump(tmp_path, "id_type_xyz")
    with pytest.raises(ValueError, match=r"id_type_xyz\.lammpstrj: a LAMMPS dump without an "
                       r"`element` column needs `types` \(--types"):  # fmt: skip
        next(io.iter_structures(path))
    unmapped = r"\(structure 0 .*LAMMPS type 3 is not in `types` \(maps 1, 2\)"
    with pytest.raises(
        ValueError, match=r"id_type_xyz\.lammpstrj: cannot read structures " + unmapped
    ):
        list(io.iter_structures(path, types="Cu,Zr"))
    blob = path.read_bytes()
    cut = tmp_path / "cut.lammpstrj"
    cut.write_bytes(blob[: blob.rindex(b"\n", 0, len(blob) - 1)])  # the last row gone
    with pytest.raises(ValueError, match=r"cut\.lammpstrj: cannot read structures \(frame 3 "
                       r"claims 5 atoms but the file ends 1 rows short"):  # fmt: skip
        next(io.iter_structures(cut, types="Cu,Zr,Al"))
    with pytest.raises(ValueError, match="no complete x y z"):
        parse_dump_frame(
            b"ITEM: TIMESTEP\n0\nITEM: NUMBER OF ATOMS\n1\nITEM: ATOMS id type x y\n1 1 0 0\n",
            {1: 29},
        )
    with pytest.raises(ValueError, match=r"LAMMPS type -1 is not in `types` \(maps 1\)"):
        parse_dump_frame(
            b"ITEM: TIMESTEP\n0\nITEM: NUMBER OF ATOMS\n2\nITEM: ATOMS id type x y z\n"
            b"1 -1 0 0 0\n2 1000000000 0 0 1\n",
            {1: 29},
        )
    with pytest.raises(ValueError, match="atom row 2 holds 4 values for the 5 columns"):
        parse_dump_frame(
            b"ITEM: TIMESTEP\n0\nITEM: NUMBER OF ATOMS\n2\nITEM: ATOMS id type x y z\n"
            b"1 1 0 0 0\n2 1 0 0\n",
            {1: 29},
        )
    empty = tmp_path / "empty.dump"
    empty.write_text("not a dump\n")
    with pytest.raises(ValueError, match=r"empty\.dump: .*not a LAMMPS dump text file"):
        next(io.iter_structures(empty, types="Cu"))


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ("1=Cu,2=Zr", {1: 29, 2: 40}),
        ("Cu, Zr", {1: 29, 2: 40}),
        ("3=al", {3: 13}),
        ({2: "Cu", 5: 40}, {2: 29, 5: 40}),
        (["Cu", 13], {1: 29, 2: 13}),
        (None, None),
    ],
)
def test_parse_types_forms(types, expected):
    assert parse_types(types) == expected


@pytest.mark.parametrize(
    ("types", "match"),
    [
        ("", "must name elements"),
        ("1=Cu,Zr", "not both"),
        ("x=Cu", "type 'x' is not an integer"),
        ("0=Cu", "integer >= 1"),
        ("1=Qq", "'Qq' is not a chemical element"),
        ("1=Cu,1=Zr", "given twice"),
        ({1: 0}, "0 is not a chemical element"),
        (3.5, "got float"),
    ],
)
def test_parse_types_refusals(types, match):
    with pytest.raises(ValueError, match=match):
        parse_types(types)


def test_cli_types_option_and_its_errors(tmp_path, monkeypatch, capsys):
    from quests_torch.cli import main

    monkeypatch.setenv("QUESTS_TORCH_CACHE", str(tmp_path / "cache"))
    path = _write_dump(tmp_path, "triclinic_positive")
    out = tmp_path / "d.npz"
    assert main(["descriptors", str(path), "-o", str(out), "-k", "8", "-c", "4", "-q"]) == 2
    assert "needs `types` (--types" in capsys.readouterr().err
    assert main(["descriptors", str(path), "-o", str(out), "-k", "8", "-c", "4", "-q",
                 "--types", "1=Cu,2=Zr"]) == 2  # fmt: skip
    assert "LAMMPS type 3 is not in `types`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["descriptors", str(path), "-o", str(out), "--types", "1=Qq"])
    assert exc.value.code == 2 and "--types" in capsys.readouterr().err
    argv = ["descriptors", str(path), "-o", str(out), "-k", "8", "-c", "4", "-q", "--types"]
    assert main([*argv, "Cu,Zr,Al"]) == 0
    ref = ase.io.read(path, ":", format="lammps-dump-text", specorder=SPECORDER)
    expected = qt.get_descriptors(ref, k=8, cutoff=4.0, dtype=torch.float64)
    assert torch.equal(io.load_descriptors(out).x, expected)


# --- torch-sim HDF5 trajectories --------------------------------------------------------------


def _sheared_cu(seed: int, shear: float):
    """A rattled 32-atom fcc cell, sheared (a non-symmetric cell: a transposed cell shows),
    a quarter of the atoms relabelled Ni (the LJ model ignores species)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    cell = atoms.cell.array.copy()
    cell[1, 0] = shear * cell[1, 1]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    atoms.numbers[::4] = 28
    return atoms


def _torch_sim_run(tmp_path, n_steps: int = 6):
    """Two systems run by torch-sim (Lennard-Jones, NVT Langevin) with a TrajectoryReporter
    writing one HDF5 trajectory per system every 2 steps."""
    ts = pytest.importorskip("torch_sim")
    from torch_sim.models.lennard_jones import LennardJonesModel

    model = LennardJonesModel(sigma=2.338, epsilon=0.4093, cutoff=5.0, dtype=torch.float64)
    nvt = ts.Integrator.nvt_langevin if hasattr(ts, "Integrator") else ts.nvt_langevin
    files = [tmp_path / f"md{i}.h5" for i in range(2)]
    ts.integrate(
        [_sheared_cu(1, 0.1), _sheared_cu(2, -0.15)],
        model,
        integrator=nvt,
        n_steps=n_steps,
        temperature=300.0,
        timestep=0.002,
        trajectory_reporter={"filenames": files, "state_frequency": 2},
    )
    return files


def _torch_sim_frames(path) -> list:
    """The frames as torch-sim itself makes ASE atoms of them (its state, transposed cell)."""
    import torch_sim as ts

    with ts.TorchSimTrajectory(path, mode="r") as traj:
        states = [traj.get_state(i, device=torch.device("cpu")) for i in range(len(traj))]
    return [ts.io.state_to_atoms(s)[0] for s in states]


def test_torch_sim_trajectory_reads_as_torch_sim_makes_its_atoms(tmp_path):
    files = _torch_sim_run(tmp_path)
    for path in files:
        ref = _torch_sim_frames(path)
        assert len(ref) in (3, 4)  # steps 2, 4, 6 (torch-sim 0.3; later ones may add step 0)
        got = list(io.iter_structures(path))
        _assert_same_frames(got, ref)
        _assert_same_descriptors(got, ref)
        assert abs(got[0].cell.array[1, 0]) > 0.3  # sheared: rows, not columns
        assert io.count_frames(path) == len(ref) and io.count_frames(path, "1::2") == len(ref) // 2
        _assert_same_frames(list(io.iter_structures(path, "1::2", readers=2)), ref[1::2])
        _assert_same_frames(io.read_structures(path, "-1"), ref[-1:])


def test_torch_sim_trajectory_screened_directly(tmp_path, monkeypatch):
    """A trajectory written by TrajectoryReporter screened as it is, by the library and by
    the command line: the table of the same frames written by ASE as a .traj (exact)."""
    from quests_torch.cli import main

    monkeypatch.setenv("QUESTS_TORCH_CACHE", str(tmp_path / "cache"))
    path = _torch_sim_run(tmp_path)[0]
    ref_frames = [_sheared_cu(s, 0.1) for s in (7, 8)]
    ase.io.write(tmp_path / "ref.extxyz", ref_frames)
    reference = qt.get_descriptors(ase.io.read(tmp_path / "ref.extxyz", ":"), k=8, cutoff=4.0)
    as_traj = tmp_path / "same.traj"
    ase.io.write(as_traj, _torch_sim_frames(path))
    kw = {"k": 8, "cutoff": 4.0, "batch_atoms": 64}
    out = qt.screen_trajectory(path, reference, tmp_path / "h5.csv", **kw)
    assert out.frames_screened == len(_torch_sim_frames(path)) >= 3
    qt.screen_trajectory(as_traj, reference, tmp_path / "traj.csv", **kw)
    assert (tmp_path / "h5.csv").read_bytes() == (tmp_path / "traj.csv").read_bytes()
    argv = ["screen", str(path), "-r", str(tmp_path / "ref.extxyz"), "-k", "8", "-c", "4",
            "--batch-atoms", "64", "--table", str(tmp_path / "cli.csv"), "-q"]  # fmt: skip
    argv += ["--device", "cpu"]
    assert main(argv) == 0
    assert (tmp_path / "cli.csv").read_bytes() == (tmp_path / "h5.csv").read_bytes()


def _write_h5(path, **arrays) -> None:
    """A trajectory in torch-sim's layout written with h5py (the variants torch-sim 0.3 and
    0.6 write: pbc as [1] or [3], static or per-frame cell and numbers, float32 or 64)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_group("header").attrs["program"] = "TorchSim"
        data, steps = f.create_group("data"), f.create_group("steps")
        for name, value in arrays.items():
            data.create_dataset(name, data=value)
            steps.create_dataset(name, data=np.arange(len(value), dtype=np.int32))


@pytest.mark.parametrize("variant", ["0.3_static", "0.6_pbc3_float64", "per_frame_all"])
def test_torch_sim_layout_variants(tmp_path, variant):
    pytest.importorskip("h5py")
    rng = np.random.default_rng(4)
    frames, n = 3, 5
    pos = rng.normal(size=(frames, n, 3)) * 2
    cols = rng.normal(size=(frames, 3, 3)) + 6 * np.eye(3)  # column vectors
    numbers = rng.integers(1, 30, size=(frames, n))
    if variant == "0.3_static":
        arrays = {"positions": pos.astype(np.float32), "cell": cols[:1].astype(np.float32),
                  "atomic_numbers": numbers[:1], "pbc": np.array([True])}  # fmt: skip
        want_pbc = [True] * 3
    elif variant == "0.6_pbc3_float64":
        arrays = {"positions": pos, "cell": cols[:1], "atomic_numbers": numbers[:1],
                  "pbc": np.array([True, False, True])}  # fmt: skip
        want_pbc = [True, False, True]
    else:
        arrays = {"positions": pos.astype(np.float32), "cell": cols.astype(np.float32),
                  "atomic_numbers": numbers, "pbc": np.array([False])}  # fmt: skip
        want_pbc = [False] * 3
    path = tmp_path / f"{variant}.hdf5"
    _write_h5(path, **arrays)
    got = list(io.iter_structures(path))
    assert len(got) == frames
    for i, atoms in enumerate(got):
        row = min(i, len(arrays["cell"]) - 1)
        assert atoms.positions.tobytes() == arrays["positions"][i].astype(np.float64).tobytes()
        np.testing.assert_array_equal(atoms.cell.array, arrays["cell"][row].astype(float).T)
        np.testing.assert_array_equal(atoms.numbers, arrays["atomic_numbers"][row])
        assert atoms.pbc.tolist() == want_pbc


def test_torch_sim_errors_name_the_file(tmp_path):
    pytest.importorskip("h5py")
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("energy", data=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.h5: not a torch-sim trajectory \(no "
                       r"/data/positions; it holds energy\)"):  # fmt: skip
        next(io.iter_structures(other))
    short = tmp_path / "short.h5"
    _write_h5(short, positions=np.zeros((3, 2, 3)), cell=np.zeros((2, 3, 3)),
              atomic_numbers=np.ones((1, 2), dtype=np.int64))  # fmt: skip
    with pytest.raises(ValueError, match=r"short\.h5: /data/cell has shape \(2, 3, 3\)"):
        next(io.iter_structures(short))
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"text\.h5: cannot read structures \(not an HDF5"):
        next(io.iter_structures(text))


# --- ASE .traj (ulm) ----------------------------------------------------------------------------


def _traj_frames() -> list:
    """Frames exercising what a .traj records: one header for equal numbers/pbc, a new one
    when they change, calculators, constraints, momenta, tags, masses, info, no cell,
    triclinic cells."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(11)
    frames = []
    for i in range(8):
        n = 4 if i < 3 else 6
        atoms = Atoms(
            ["Cu", "Zn", "O"][i % 3 :] + ["Cu"] * (n - len(["Cu", "Zn", "O"][i % 3 :])),
            positions=rng.normal(size=(n, 3)) * 2,
            cell=None if i == 5 else rng.normal(scale=0.3, size=(3, 3)) + 6 * np.eye(3),
            pbc=[True, i % 2 == 0, True] if i != 5 else False,
        )
        if i % 2:
            atoms.calc = SinglePointCalculator(atoms, energy=-i, forces=rng.normal(size=(n, 3)))
        if i == 2:
            atoms.set_constraint(FixAtoms(indices=[0]))
            atoms.set_momenta(rng.normal(size=(n, 3)))
            atoms.set_tags(list(range(n)))
            atoms.set_masses(np.full(n, 2.0))
        atoms.info["note"] = f"frame {i}"
        frames.append(atoms)
    frames[1].numbers = frames[0].numbers  # the same header as frame 0: not written again
    frames[1].pbc = frames[0].pbc
    return frames


@pytest.mark.parametrize("index", [":", "2:7:2", "-1", "5"])
def test_ase_traj_reader_gives_the_frames_ase_gives(tmp_path, index):
    path = tmp_path / "frames.traj"
    ase.io.write(path, _traj_frames())
    ref = ase.io.read(path, index)
    ref = ref if isinstance(ref, list) else [ref]
    got = list(io.iter_structures(path, index, readers=0))
    _assert_same_frames(got, ref)
    _assert_same_descriptors(got, ref)
    assert io.count_frames(path, index) == len(ref)


def test_ase_traj_errors_name_the_file(tmp_path):
    from ase.io import ulm

    garbage = tmp_path / "garbage.traj"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"garbage\.traj: cannot read structures \(not an ASE"):
        next(io.iter_structures(garbage, readers=0))
    other = tmp_path / "other.traj"
    with ulm.open(other, "w", tag="SOMETHING") as w:
        w.write(x=1)
        w.sync()
    with pytest.raises(ValueError, match=r"other\.traj: an ulm file tagged 'SOMETHING'"):
        next(io.iter_structures(other, readers=0))


def test_formats_are_told_by_name_and_dump_names_by_their_first_line(tmp_path):
    dump = _write_dump(tmp_path, "id_type_xyz").read_text()
    (tmp_path / "dump.cuzr.0").write_text(dump)
    (tmp_path / "dump_notes.txt").write_text("not a dump\n")
    (tmp_path / "dump.xyz").write_text("1\n\nH 0 0 0\n")
    expected = {
        "a.lammpstrj": "lammps-dump", "a.DUMP": "lammps-dump", "dump.cuzr.0": "lammps-dump",
        "dump_notes.txt": None, "dump.xyz": "xyz", "a.extxyz": "xyz", "a.h5": "torch-sim",
        "a.hdf5": "torch-sim", "a.traj": "ase-traj", "POSCAR": None, "a.cif": None,
    }  # fmt: skip
    for name, fmt in expected.items():
        assert formats.detect_format(tmp_path / name) == fmt, name
    assert formats.native_format(tmp_path / "a.traj", None) is None  # ASE keeps calculators
    assert formats.native_format(tmp_path / "a.traj", 0) == "ase-traj"
    assert formats.native_format(tmp_path / "a.h5", None) == "torch-sim"
    frames = list(io.iter_structures(tmp_path / "dump.cuzr.0", types="Cu,Zr,Al"))
    assert len(frames) == 3


def test_types_are_part_of_the_identity_of_a_screening_and_a_store(tmp_path, monkeypatch):
    monkeypatch.setenv("QUESTS_TORCH_CACHE", str(tmp_path / "cache"))
    path = _write_dump(tmp_path, "triclinic_positive")
    ref = ase.io.read(path, ":", format="lammps-dump-text", specorder=SPECORDER)
    reference = qt.get_descriptors(ref[:1], k=8, cutoff=4.0)
    kw = {"k": 8, "cutoff": 4.0}
    table = tmp_path / "s.csv"
    first = qt.screen_trajectory(path, reference, table, types="Cu,Zr,Al", **kw)
    assert first.frames_screened == 2
    again = qt.screen_trajectory(path, reference, table, types={1: "Cu", 2: "Zr", 3: "Al"}, **kw)
    assert again.frames_screened == 0  # the same map in another form: the same screening
    with pytest.raises(ValueError, match="trajectory's content changed"):
        qt.screen_trajectory(path, reference, table, types="Cu,Zr,Ni", **kw)
    store = tmp_path / "d.qstore"
    written = qt.write_descriptor_store(path, store, types="Cu,Zr,Al", **kw)
    expected = qt.get_descriptors(ref, k=8, cutoff=4.0, dtype=torch.float64)
    torch.testing.assert_close(written.tensor().double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="trajectory"):
        qt.write_descriptor_store(path, store, types="Cu,Zr,Ni", **kw)
