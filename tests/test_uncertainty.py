"""UncertaintyBank (per-atom dH as an nn.Module) and the ASE calculators built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.mixing import SumCalculator
from ase.md.langevin import Langevin

try:
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # ASE < 3.28
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
from ase.md.verlet import VelocityVerlet
from conftest import check_against_fd

from quests_torch import AtomsBatch, NeighborCache, descriptors_from_tensors, get_descriptors
from quests_torch.calculators import (
    EntropyBiasCalculator,
    ExtrapolationError,
    QuestsUncertaintyCalculator,
)
from quests_torch.io import DescriptorSet, save_descriptors
from quests_torch.metrics import delta_entropy, diversity, entropy
from quests_torch.uncertainty import UncertaintyBank, per_structure_summary


def _cu(reps=(3, 3, 3), stdev=0.05, seed=1, a=3.61):
    atoms = bulk("Cu", "fcc", a=a, cubic=True) * reps
    if stdev:
        atoms.rattle(stdev, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def bank(ref):
    """Thermal Cu bank: 768 environments of 300 K EMT Cu (k=32, cutoff=5, h=0.015)."""
    return UncertaintyBank(torch.from_numpy(ref["x_solid"]))


def _small_bank(**kw):
    """A cheap bank for gradcheck/state tests: k=6, cutoff=3.5."""
    frames = [_cu((1, 1, 1), 0.1, seed=s, a=3.6) for s in (2, 3)]
    return UncertaintyBank.from_atoms(frames, k=6, cutoff=3.5, **kw)


# ------------------------------------------------------------------------- the module


def test_module_equals_metrics_delta_entropy(bank, device):
    bank = UncertaintyBank.from_descriptors(bank.descriptors, device=device)
    frames = [_cu(seed=1), _cu((2, 2, 2), stdev=0.12, seed=2)]
    b = AtomsBatch.from_ase(frames, device=device)
    dh = bank(b.positions, b.cell, b.pbc, b.system_idx)
    assert dh.device.type == torch.device(device).type and dh.shape == (108 + 32,)
    y = get_descriptors(frames, device=device)
    expected = delta_entropy(y, bank.descriptors, 0.015)
    assert torch.allclose(dh, expected, rtol=0, atol=1e-12)
    assert (dh[108:] > 0).any() and (dh[:108] <= 0).all()  # the hot cell is partly novel

    res = bank.evaluate(b.positions, b.cell, b.pbc, b.system_idx, threshold=0.0)
    for s, (a0, a1) in enumerate([(0, 108), (108, 140)]):
        part = expected[a0:a1]
        assert torch.allclose(res.max_dH[s], part.max(), rtol=0, atol=1e-12)
        assert torch.allclose(res.mean_dH[s], part.mean(), rtol=0, atol=1e-12)
        assert float(res.fraction_above[s]) == pytest.approx(float((part > 0).double().mean()))
    one = bank.evaluate_atoms(frames[1])
    assert torch.allclose(one.dH, expected[108:], rtol=0, atol=1e-12)


def test_per_structure_summary_matches_a_loop_and_is_differentiable(device):
    gen = torch.Generator().manual_seed(0)
    counts = [3, 1, 7, 5]
    idx = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).to(device)
    dh = torch.randn(sum(counts), generator=gen, dtype=torch.float64).to(device)
    dh.requires_grad_(True)
    res = per_structure_summary(dh, idx, 4, threshold=0.2)
    (res.max_dH.sum() + res.mean_dH.sum()).backward()
    # d(max + mean)/d dH: 1/n_s on every atom of structure s, plus 1 on its maximum
    expected = 1.0 / torch.tensor(counts, dtype=torch.float64)[idx.cpu()]
    for s, start in enumerate(np.cumsum([0, *counts[:-1]])):
        expected[start + int(dh.detach().cpu()[idx.cpu() == s].argmax())] += 1.0
    assert torch.isfinite(dh.grad).all()
    torch.testing.assert_close(dh.grad.cpu(), expected, rtol=1e-15, atol=1e-15)
    top, mean, frac = (v.detach().cpu() for v in res[1:])
    for s in range(4):
        part = dh.detach().cpu()[idx.cpu() == s]
        assert float(top[s]) == float(part.max())
        assert float(mean[s]) == pytest.approx(float(part.mean()), abs=1e-15)
        assert float(frac[s]) == pytest.approx(float((part > 0.2).double().mean()))


def test_state_dict_round_trip_restores_bank_and_parameters(tmp_path, device):
    src = _small_bank(h=0.3, dtype=torch.float32, device=device)
    query = _cu((1, 1, 1), 0.2, seed=9, a=3.6)
    before = src.evaluate_atoms(query).dH
    path = tmp_path / "bank.pt"
    torch.save(src.state_dict(), path)
    state = torch.load(path, weights_only=True)  # the extra state is plain Python data

    fresh = UncertaintyBank()  # defaults, empty: k=32, cutoff=5, h=0.015, float64
    fresh.load_state_dict(state)
    assert (fresh.k, fresh.cutoff, fresh.h, fresh.dtype) == (6, 3.5, 0.3, torch.float32)
    assert fresh.n_references == src.n_references and fresh.width == 11
    fresh.to(device)
    assert torch.equal(fresh.evaluate_atoms(query).dH, before)

    other = UncertaintyBank(torch.zeros(5, 63))  # a bank of another size and width
    other.load_state_dict(state)
    assert other.n_references == src.n_references and other.descriptors.shape[1] == 11
    with pytest.raises(ValueError, match="inconsistent UncertaintyBank state"):
        bad = dict(state)
        bad["descriptors"] = torch.zeros(4, 63)
        UncertaintyBank().load_state_dict(bad)


def test_add_grows_the_bank_from_every_kind_of_input(tmp_path):
    bank = _small_bank(h=0.05)
    n0 = bank.n_references
    new = _cu((1, 1, 1), 0.25, seed=11, a=3.6)
    assert bank.evaluate_atoms(new).max_dH > 0  # not covered yet
    bank.add(new)  # ase.Atoms
    assert bank.n_references == n0 + 4
    assert (bank.evaluate_atoms(new).dH <= 0).all()  # p >= 1: each environment is in the bank
    x = get_descriptors(new, k=6, cutoff=3.5)
    bank.add(x).add(x.numpy())  # tensor, numpy
    bank.add([new, new])  # list
    bank.add(AtomsBatch.from_ase(new))
    bank.add(DescriptorSet(x, np.array([4]), 6, 3.5, "float64"))
    save_descriptors(tmp_path / "d.npz", x, [4], k=6, cutoff=3.5)
    bank.add(tmp_path / "d.npz")
    new.write(tmp_path / "s.extxyz")
    bank.add(str(tmp_path / "s.extxyz"))  # a structure file
    assert bank.n_references == n0 + 4 * 9


def test_from_file_reads_parameters_from_metadata(tmp_path):
    frames = [_cu((1, 1, 1), 0.1, seed=s, a=3.6) for s in (2, 3)]
    x = get_descriptors(frames, k=6, cutoff=3.5)
    save_descriptors(tmp_path / "a.npz", x, [4, 4], k=6, cutoff=3.5)
    save_descriptors(tmp_path / "b.pt", x[:4], [4], k=6, cutoff=3.5)
    bank = UncertaintyBank.from_file([tmp_path / "a.npz", tmp_path / "b.pt"], h=0.3)
    assert (bank.k, bank.cutoff, bank.n_references) == (6, 3.5, 12)
    ref = _small_bank(h=0.3)
    q = _cu((1, 1, 1), 0.2, seed=9, a=3.6)
    assert bank.evaluate_atoms(q).dH.shape == ref.evaluate_atoms(q).dH.shape
    # the bank of 12 rows (8 + 4 duplicated) vs 8 rows: p grows by the duplicates only
    assert (bank.evaluate_atoms(q).dH <= ref.evaluate_atoms(q).dH + 1e-12).all()
    with pytest.raises(ValueError, match="computed with k=6, not the requested k=32"):
        UncertaintyBank.from_file(tmp_path / "a.npz", k=32)
    with pytest.raises(ValueError, match="not a descriptor file"):
        UncertaintyBank.from_file(tmp_path / "a.extxyz")
    save_descriptors(
        tmp_path / "c.npz", get_descriptors(frames, k=6, cutoff=4.0), [4, 4], k=6, cutoff=4.0
    )
    with pytest.raises(ValueError, match=r"cutoff=4\.0 but the bank uses cutoff=3\.5"):
        UncertaintyBank.from_file([tmp_path / "a.npz", tmp_path / "c.npz"])


def test_errors_name_the_problem(bank):
    q = _cu()
    b = AtomsBatch.from_ase(q)
    with pytest.raises(ValueError, match="the uncertainty bank is empty"):
        UncertaintyBank()(b.positions, b.cell, b.pbc)
    with pytest.raises(ValueError, match="has 11 descriptor columns but the bank expects 63"):
        bank.delta_entropy(get_descriptors(q, k=6, cutoff=3.5))
    with pytest.raises(ValueError, match="has 11 descriptor columns"):
        UncertaintyBank().add(torch.zeros(3, 11))
    x = get_descriptors(q, cutoff=4.0)  # right width, wrong cutoff
    with pytest.raises(ValueError, match=r"cutoff=4\.0 but the bank uses cutoff=5\.0"):
        bank.delta_entropy(DescriptorSet(x, np.array([108]), 32, 4.0, "float64"))
    with pytest.raises(ValueError, match="k=31 but the bank uses k=32"):
        bank.delta_entropy(x, k=31)
    with pytest.raises(ValueError, match=r"cutoff=4\.0 but the bank uses cutoff=5\.0"):
        UncertaintyBank(torch.zeros(1, 63)).add(
            DescriptorSet(x, np.array([108]), 32, 4.0, "float64")
        )
    clash = q.copy()
    clash.positions[5] = clash.positions[17]
    with pytest.raises(ValueError, match="coincident atoms in structure 0: atom 5 and atom 17"):
        bank.evaluate_atoms(clash)
    cb = AtomsBatch.from_ase(clash)
    with pytest.raises(ValueError, match="coincident atoms"):
        bank(cb.positions, cb.cell, cb.pbc)
    with pytest.raises(ValueError, match="`h` must be positive"):
        UncertaintyBank(h=0.0)
    with pytest.raises(TypeError, match=r"`dtype` must be torch\.float32 or torch\.float64"):
        UncertaintyBank(dtype=torch.float16)
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        UncertaintyBank(k=0)
    with pytest.raises(TypeError, match="`data` must be descriptors"):
        bank.add(3)
    with pytest.raises(ValueError, match="NaN or inf"):
        UncertaintyBank(torch.full((2, 63), math.nan))
    multi = UncertaintyBank(torch.zeros(1, 63 * 3), species=["Cu", "Au"])
    with pytest.raises(ValueError, match="`numbers` is required"):
        multi(b.positions, b.cell, b.pbc)


def test_multicomponent_bank_uses_numbers():
    alloy = _cu((2, 2, 2), 0.05, seed=4)
    alloy.symbols[::3] = "Au"
    bank = UncertaintyBank.from_atoms(alloy, k=8, cutoff=4.0, h=0.1, species=["Cu", "Au"])
    assert bank.width == 3 * 15 and bank.species == [79, 29]  # ordered by symbol: Au, Cu
    q = alloy.copy()
    q.rattle(0.05, seed=5)
    y = get_descriptors(q, k=8, cutoff=4.0, species=["Au", "Cu"])
    expected = delta_entropy(y, bank.descriptors, 0.1)
    assert torch.allclose(bank.evaluate_atoms(q).dH, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("skin", [None, 1.0], ids=["new-search", "reused-list"])
def test_full_precision_whatever_the_matmul_flags(bank, device, restore_precision_flags, skin):
    b32 = UncertaintyBank.from_descriptors(bank.descriptors, dtype=torch.float32, device=device)
    b32.neighbors = None if skin is None else NeighborCache(skin)
    q = AtomsBatch.from_ase(_cu((2, 2, 2), 0.1, seed=3), device=device, dtype=torch.float32)
    b32(q.positions, q.cell, q.pbc)  # with a list: a new search, then `clean` builds it
    clean = b32(q.positions, q.cell, q.pbc)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    if hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    dirty = b32(q.positions, q.cell, q.pbc)
    if skin is not None:  # `dirty` reused the list `clean` was computed from
        assert (b32.neighbors.builds, b32.neighbors.reuses) == (1, 1)
    if device == "cpu":
        assert torch.equal(clean, dirty)
    else:  # GPU reductions need not be bitwise reproducible; TF32 would be off by ~1e-3
        assert torch.allclose(clean, dirty, rtol=0, atol=1e-6)
    b64 = UncertaintyBank.from_descriptors(bank.descriptors, device=device)
    exact = b64(q.positions.double(), q.cell.double(), q.pbc)
    assert torch.allclose(clean.double(), exact, rtol=0, atol=1e-3)


@pytest.mark.cuda
def test_device_mismatch_is_an_error(bank):
    q = AtomsBatch.from_ase(_cu(), device="cuda")
    with pytest.raises(ValueError, match="but the bank is on cpu"):
        bank(q.positions, q.cell, q.pbc)


# ------------------------------------------------------------------------- gradients


def test_gradcheck_dh_wrt_positions_and_cell():
    bank = _small_bank(h=0.5)
    q = AtomsBatch.from_ase(_cu((1, 1, 1), 0.15, seed=6, a=3.6))
    pos = q.positions.clone().requires_grad_(True)
    cell = q.cell.clone().requires_grad_(True)

    def f(p, c):
        res = bank.evaluate(p, c, q.pbc)
        return torch.cat([res.dH, res.max_dH, res.mean_dH])

    assert torch.autograd.gradcheck(f, (pos, cell), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_entropy_and_diversity_wrt_cell():
    """Positions are covered by tests/test_gradients.py; the cell (periodic images) here."""
    q = AtomsBatch.from_ase(_cu((1, 1, 1), 0.1, seed=7, a=3.6))
    cell = q.cell.clone().requires_grad_(True)

    def f(c):
        x = descriptors_from_tensors(q.positions, c, q.pbc, q.system_idx, k=6, cutoff=3.5)
        return torch.stack([entropy(x, h=0.1), diversity(x, h=0.1)])

    assert torch.autograd.gradcheck(f, (cell,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_dh_and_entropy_gradients_match_finite_differences_on_thermal_cell(bank):
    """108-atom Cu (3x3x3 FCC, a = 3.61 Å, rattled 0.08 Å ~ 300 K amplitude), k=32, r_c=5,
    h=0.015 against the 768-environment thermal bank: d(mean dH)/dr, d(max dH)/dr,
    d(mean dH)/d cell and dH/d cell of the structure's own entropy."""
    q = AtomsBatch.from_ase(_cu(stdev=0.08, seed=21))
    pos0 = q.positions

    def mean_dh(p):
        with torch.no_grad():
            return bank(p, q.cell, q.pbc).mean()

    p = pos0.clone().requires_grad_(True)
    dh = bank(p, q.cell, q.pbc)
    g_mean, g_max = (torch.autograd.grad(v, p, retain_graph=True)[0] for v in (dh.mean(), dh.max()))
    rng = np.random.default_rng(0)
    coords = [
        (int(a), int(x))
        for a, x in zip(rng.integers(0, 108, 10), rng.integers(0, 3, 10), strict=True)
    ]
    check_against_fd(mean_dh, pos0, g_mean, coords)
    top = int(dh.argmax())
    near = [(top, 0), (top, 1), (top, 2)]

    def max_dh(pp):
        with torch.no_grad():
            return bank(pp, q.cell, q.pbc).max()

    check_against_fd(max_dh, pos0, g_max, near)

    cell = q.cell.clone().requires_grad_(True)
    (g_cell,) = torch.autograd.grad(bank(pos0, cell, q.pbc).mean(), cell)

    def mean_dh_cell(c):
        with torch.no_grad():
            return bank(pos0, c, q.pbc).mean()

    cells = [(0, 0, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0)]
    check_against_fd(mean_dh_cell, q.cell, g_cell, cells)

    def h_cell(c):
        return entropy(descriptors_from_tensors(pos0, c, q.pbc, q.system_idx), h=0.015)

    (g_h,) = torch.autograd.grad(h_cell(cell), cell)
    with torch.no_grad():
        check_against_fd(h_cell, q.cell, g_h, cells[:3])


# ------------------------------------------------------------------------- ASE wrapper


def test_wrapper_returns_emt_results_unchanged_plus_dh(bank):
    atoms = _cu(seed=3)
    bare = atoms.copy()
    bare.calc = EMT()
    bare.get_forces()
    atoms.calc = QuestsUncertaintyCalculator(EMT(), bank)
    forces = atoms.get_forces()
    assert np.array_equal(forces, bare.get_forces())
    assert atoms.get_potential_energy() == bare.get_potential_energy()
    assert np.array_equal(atoms.get_stress(), bare.get_stress())
    for key, value in bare.calc.results.items():
        assert np.array_equal(atoms.calc.results[key], value)
    dh = atoms.calc.results["dH"]
    assert dh.shape == (108,) and dh.dtype == np.float64
    assert np.allclose(dh, bank.evaluate_atoms(atoms).dH.numpy(), rtol=0, atol=1e-12)
    assert atoms.calc.get_property("max_dH") == dh.max()
    assert atoms.calc.n_evaluations == 1
    atoms.get_potential_energy()  # cached: no new evaluation
    assert atoms.calc.n_evaluations == 1


def _hot_md(calc, seed=0, dyn_cls="verlet"):
    atoms = _cu(stdev=0.0)
    thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(seed))
    atoms.calc = calc
    if dyn_cls == "verlet":
        dyn = VelocityVerlet(atoms, 2 * units.fs)
    else:
        dyn = Langevin(
            atoms,
            2 * units.fs,
            temperature_K=300,
            friction=0.02,
            rng=np.random.default_rng(seed),
            fixcm=False,
        )
    return atoms, dyn


def test_wrapper_stops_md_when_threshold_exceeded(bank):
    calc = QuestsUncertaintyCalculator(EMT(), bank, threshold=1.0)
    atoms, dyn = _hot_md(calc)
    with pytest.raises(ExtrapolationError, match="exceeds the threshold 1") as err:
        dyn.run(100)
    e = err.value
    assert isinstance(e, RuntimeError)
    assert e.max_dH > 1.0 and e.dH.shape == (108,) and e.call >= 1  # the lattice start is fine
    assert dyn.nsteps < 100 and calc.history[0][1] <= 1.0
    assert np.allclose(e.atoms.positions, atoms.positions)
    assert calc.results["max_dH"] == e.max_dH  # results of that configuration are kept


def test_wrapper_flags_and_evaluates_every_n(bank):
    calc = QuestsUncertaintyCalculator(EMT(), bank, threshold=1.0, action="flag", every=5)
    _, dyn = _hot_md(calc)
    dyn.run(40)
    assert calc.n_configurations == 41
    assert calc.n_evaluations == 9  # configurations 0, 5, ..., 40
    assert [c for c, _ in calc.history] == list(range(0, 41, 5))
    assert calc.extrapolated and all(v > 1.0 for _, v in calc.events)
    with pytest.raises(ValueError, match="`action` must be 'raise' or 'flag'"):
        QuestsUncertaintyCalculator(EMT(), bank, action="stop")
    with pytest.raises(ValueError, match="`every` must be a positive int"):
        QuestsUncertaintyCalculator(EMT(), bank, every=0)


# ------------------------------------------------------------------------- bias


def test_bias_energy_forces_stress_are_consistent(bank):
    atoms = _cu((2, 2, 2), 0.08, seed=8)
    for kw in (
        {"strength": 0.5, "entropy_strength": 0.3},
        {"strength": 0.5, "reduction": "softmax", "beta": 2.0, "saturation": 5.0},
    ):
        calc = EntropyBiasCalculator(bank, **kw)
        atoms.calc = calc
        forces = atoms.get_forces()
        stress = atoms.get_stress()
        x0 = torch.from_numpy(atoms.positions.copy())

        def energy(x, kw=kw):
            a = atoms.copy()
            a.positions = x.numpy()
            a.calc = EntropyBiasCalculator(bank, **kw)
            return a.get_potential_energy()

        coords = [(0, 0), (9, 1), (22, 2), (31, 0), (31, 1), (5, 2)]
        check_against_fd(energy, x0, torch.from_numpy(-forces), coords)

        def strained(s, kw=kw):
            a = atoms.copy()
            a.set_cell(atoms.cell[:] @ (np.eye(3) + s.numpy()), scale_atoms=True)
            a.calc = EntropyBiasCalculator(bank, **kw)
            return a.get_potential_energy()

        full = np.array(
            [
                [stress[0], stress[5], stress[4]],
                [stress[5], stress[1], stress[3]],
                [stress[4], stress[3], stress[2]],
            ]
        )
        check_against_fd(
            strained,
            torch.zeros(3, 3, dtype=torch.float64),
            torch.from_numpy(full * atoms.get_volume()),
            [(0, 0), (2, 2), (0, 1)],
        )
        assert calc.results["dH"].shape == (32,)


def test_biased_md_reaches_higher_dh_than_unbiased(bank):
    """Same seed, same Langevin noise: EMT alone vs EMT + bias (mean dH, lambda = 1 eV/nat)."""

    def run(calc):
        atoms, dyn = _hot_md(calc, seed=3, dyn_cls="langevin")
        seen = []
        dyn.attach(lambda: seen.append(float(bank.evaluate_atoms(atoms).mean_dH)), interval=10)
        dyn.run(60)
        return np.array(seen[2:])  # after 20 steps

    plain = run(EMT())
    bias = EntropyBiasCalculator(bank, strength=1.0)
    biased = run(SumCalculator([EMT(), bias]))
    assert biased.mean() > plain.mean() + 1.0
    assert biased[-1] > plain[-1]
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        EntropyBiasCalculator(bank, reduction="max")


def test_bias_on_a_molecule_has_no_stress(bank):
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=1)
    small = UncertaintyBank.from_atoms(mol, k=6, cutoff=3.5, h=0.3)
    mol.calc = EntropyBiasCalculator(small, strength=0.1)
    assert mol.get_forces().shape == (9, 3)
    assert "stress" not in mol.calc.results


# ------------------------------------------------------------------------- prepared bank


def test_prepared_bank_is_reused_and_rebuilt_when_the_bank_changes(bank, tmp_path):
    import copy
    import pickle

    x = bank.descriptors[:300].clone()
    b = UncertaintyBank(x)
    q = AtomsBatch.from_ase(_cu((2, 2, 2), 0.1, seed=4))

    def fresh(m):  # what the general path gives for m's current state
        y = m.descriptors_of(q.positions, q.cell, q.pbc)
        return delta_entropy(y, m.descriptors.clone(), m.h)

    def check(m):
        assert torch.allclose(m(q.positions, q.cell, q.pbc), fresh(m), rtol=0, atol=1e-12)

    check(b)
    prep = b.prepared()
    assert b.prepared() is prep  # reused while nothing changes
    b.add(bank.descriptors[300:400])
    assert b.prepared() is not prep and b.prepared().n_references == 400
    check(b)
    prep = b.prepared()
    with torch.no_grad():
        b.descriptors[:50] += 0.01  # in place: seen by the version counter
    assert b.prepared() is not prep
    check(b)
    b.h = 0.03
    check(b)
    other = UncertaintyBank(bank.descriptors[:100], h=0.02)
    b.load_state_dict(other.state_dict())
    assert b.n_references == 100 and b.h == 0.02
    check(b)
    b.load_state_dict(UncertaintyBank(bank.descriptors[100:200], h=0.02).state_dict())
    check(b)  # same shape: copied in place
    b32 = b.to(torch.float32)
    assert b32.prepared().log_kernel_sum(b32.descriptors[:2]).dtype == torch.float32
    b.double()
    for clone in (copy.deepcopy(b), pickle.loads(pickle.dumps(b))):
        assert clone._prepared is None or clone._prepared[2] is clone.descriptors
        check(clone)
    torch.save(b.state_dict(), tmp_path / "bank.pt")
    assert "_prepared" not in str(list(b.state_dict()))


def test_prepared_bank_under_inference_mode_then_with_gradients(bank):
    with torch.inference_mode():
        b = UncertaintyBank(bank.descriptors[:200].clone())
        q = AtomsBatch.from_ase(_cu((2, 2, 2), 0.1, seed=5))
        dh = b(q.positions, q.cell, q.pbc)
    pos = q.positions.clone().requires_grad_(True)
    out = b(pos, q.cell, q.pbc)
    (g,) = torch.autograd.grad(out.sum(), pos)
    assert torch.allclose(out.detach(), dh, rtol=0, atol=1e-12) and torch.isfinite(g).all()
