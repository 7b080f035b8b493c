"""torch-sim integration: UncertaintyModel, EntropyBiasModel, reporter properties, batched runs.

Lennard-Jones with Cu-like parameters (epsilon = 0.4093 eV, sigma = 2.338 Å) drives small FCC
Cu cells; the bank holds rattled 32-atom Cu cells (k = 8, r_c = 4 Å, so the tests stay fast).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from importlib.metadata import version

import numpy as np
import pytest
import torch

ts = pytest.importorskip("torch_sim")

from ase.build import bulk  # noqa: E402
from ase.stress import voigt_6_to_full_3x3_stress  # noqa: E402
from conftest import central_difference  # noqa: E402
from torch_sim.models.lennard_jones import LennardJonesModel  # noqa: E402

from quests_torch import EntropyBiasCalculator, ExtrapolationError, UncertaintyBank  # noqa: E402
from quests_torch.integrations.torch_sim import (  # noqa: E402
    BatchExtrapolationError,
    EntropyBiasModel,
    UncertaintyModel,
    run_with_uncertainty,
    state_tensors,
    uncertainty_properties,
)
from quests_torch.uncertainty import per_structure_summary  # noqa: E402

F64 = torch.float64
CPU = torch.device("cpu")
K, CUTOFF = 8, 4.0
NVT = ts.Integrator.nvt_langevin if hasattr(ts, "Integrator") else ts.nvt_langevin
FIRE = ts.Optimizer.fire if hasattr(ts, "Optimizer") else ts.optimizers.fire
# tested: 0.3.x on Python 3.11, 0.6.x on Python 3.12 (`make test-ts06-mace`)
TS_VERSION = tuple(int(p) for p in re.findall(r"\d+", version("torch-sim-atomistic"))[:3])


def cu(rattle: float, seed: int, n: int = 2):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def lj(dtype=F64, device=CPU, **kw):
    kw.setdefault("compute_stress", True)
    return LennardJonesModel(
        sigma=2.338, epsilon=0.4093, cutoff=5.0, dtype=dtype, device=device, **kw
    )


@pytest.fixture(scope="module")
def bank():
    return UncertaintyBank.from_atoms([cu(0.04, s) for s in range(4)], k=K, cutoff=CUTOFF)


@pytest.fixture(scope="module")
def systems():
    # in-domain, near the edge, far out: max dH increases with the rattle
    return [cu(0.03, 10), cu(0.06, 11), cu(0.25, 12)]


@pytest.fixture
def state(systems):
    return ts.io.atoms_to_state(systems, CPU, F64)


def bank_dh(bank, st):
    """The contract: the bank on the state's tensors, cell transposed to rows."""
    pbc = torch.as_tensor(st.pbc, dtype=torch.bool).expand(st.cell.shape[0], 3)
    return bank(st.positions, st.cell.mT, pbc, st.system_idx)


# ---------------------------------------------------------------------------- UncertaintyModel
def test_outputs_are_model_outputs_plus_bank_dh(bank, state):
    model = lj()
    wrapped = UncertaintyModel(model, bank, threshold=0.5)
    out, ref = wrapped(state), model(state)
    for key, value in ref.items():
        assert torch.equal(out[key], value), key
    dh = bank_dh(bank, state)
    torch.testing.assert_close(out["dH"], dh, rtol=0, atol=1e-12)
    assert out["dH"].shape == (state.n_atoms,) and out["dH"].dtype == F64
    for s in range(3):
        mine = dh[state.system_idx == s]
        torch.testing.assert_close(out["max_dH"][s], mine.max(), rtol=0, atol=1e-12)
        torch.testing.assert_close(out["mean_dH"][s], mine.mean(), rtol=0, atol=1e-12)
        assert float(out["fraction_above"][s]) == pytest.approx(float((mine > 0.5).double().mean()))
    assert out["max_dH"][2] > out["max_dH"][1] > out["max_dH"][0]


def test_state_tensors_accepts_dicts_with_batch_and_tensor_pbc(bank, state):
    wrapped = UncertaintyModel(lj(), bank)
    as_dict = {
        "positions": state.positions,
        "cell": state.cell,
        "pbc": torch.tensor([True, True, True]),
        "batch": state.system_idx,
        "atomic_numbers": state.atomic_numbers,
    }
    t = state_tensors(as_dict)
    assert t.pbc.shape == (3, 3) and bool(t.pbc.all()) and t.n_systems == 3
    torch.testing.assert_close(t.cell, state.cell.mT)
    torch.testing.assert_close(wrapped.uncertainty(as_dict).dH, bank_dh(bank, state))


def test_forwards_the_wrapped_model_attributes(bank):
    model = lj(compute_stress=False)
    wrapped = UncertaintyModel(model, bank)
    assert wrapped.device == model.device and wrapped.dtype == model.dtype
    assert wrapped.compute_forces is True and wrapped.compute_stress is False
    assert wrapped.memory_scales_with == model.memory_scales_with
    assert wrapped.sigma is model.sigma and wrapped.per_atom_energies is False
    with pytest.raises(NotImplementedError):  # LJ refuses, as torch-sim models do
        wrapped.compute_stress = True


def test_passes_torch_sims_model_validation(bank):
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(UncertaintyModel(lj(), bank), CPU, F64)


def test_works_in_integrate_nvt_langevin_at_several_temperatures(bank, systems):
    wrapped = UncertaintyModel(lj(), bank)
    temps = [50.0, 300.0, 900.0]
    n = 6
    final = ts.integrate(
        systems, wrapped, integrator=NVT, n_steps=n, temperature=[temps] * n, timestep=0.002
    )
    assert final.n_systems == 3
    assert torch.isfinite(final.positions).all()
    out = wrapped(final)
    torch.testing.assert_close(out["dH"], bank_dh(bank, final), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Optimize has reached max steps")
def test_works_in_optimize(bank, systems):
    wrapped = UncertaintyModel(lj(), bank)
    final = ts.optimize(systems[:2], wrapped, optimizer=FIRE, max_steps=5)
    assert final.n_systems == 2 and torch.isfinite(final.positions).all()


def test_retain_graph_is_the_wrapped_models(bank):
    """torch-sim 0.6 models carry `retain_graph` (keep the outputs' graph); the wrapper reads
    and sets the wrapped model's, and has none where the model has none (0.3)."""
    model = lj()
    wrapped = UncertaintyModel(model, bank)
    if not hasattr(model, "retain_graph"):
        assert TS_VERSION < (0, 6)
        assert not hasattr(wrapped, "retain_graph")
        return
    assert wrapped.retain_graph is False
    wrapped.retain_graph = True
    assert model.retain_graph is True and wrapped.retain_graph is True
    wrapped.retain_graph = False
    assert model.retain_graph is False
    assert not hasattr(EntropyBiasModel(None, bank), "retain_graph")


def test_outputs_are_kept_on_the_state(bank, systems):
    """torch-sim >= 0.6 stores a model's extra outputs on the state (per atom or per system):
    after integrate, the state's dH is the bank's on its final positions."""
    if TS_VERSION < (0, 6):
        pytest.skip("torch-sim < 0.6 keeps only energy, forces and stress on the state")
    wrapped = UncertaintyModel(lj(), bank, threshold=0.5)
    final = ts.integrate(
        systems, wrapped, integrator=NVT, n_steps=3, temperature=300.0, timestep=0.002
    )
    dh = bank_dh(bank, final)
    torch.testing.assert_close(final.dH, dh, rtol=0, atol=1e-12)
    ref = per_structure_summary(dh, final.system_idx, 3, 0.5)
    torch.testing.assert_close(final.max_dH, ref.max_dH, rtol=0, atol=1e-12)
    torch.testing.assert_close(final.fraction_above, ref.fraction_above)
    first = final[0]  # slicing keeps the per-atom and per-system extras of that system
    torch.testing.assert_close(first.dH, dh[final.system_idx == 0])
    torch.testing.assert_close(first.max_dH, ref.max_dH[:1])


def test_binning_autobatcher_in_integrate(bank):
    """Systems of 32, 108 and 32 atoms in bins of at most 110 atoms: two batches, run one
    after the other and put back in the input order."""
    sizes = [cu(0.03, 20), cu(0.03, 21, n=3), cu(0.05, 22)]
    wrapped = UncertaintyModel(lj(), bank)
    batcher = ts.BinningAutoBatcher(wrapped, memory_scales_with="n_atoms", max_memory_scaler=110)
    final = ts.integrate(
        sizes, wrapped, integrator=NVT, n_steps=3, temperature=100.0, timestep=0.002,
        autobatcher=batcher,
    )  # fmt: skip
    counts = torch.bincount(final.system_idx, minlength=3).tolist()
    assert counts == [32, 108, 32]
    torch.testing.assert_close(wrapped(final)["dH"], bank_dh(bank, final), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Optimize has reached max steps")
def test_in_flight_autobatcher_in_optimize(bank):
    """Systems of 32, 108 and 32 atoms through the hot-swapping batcher (at most 110 atoms at
    a time): each relaxed below the force tolerance, returned in the input order."""
    sizes = [cu(0.05, 23), cu(0.03, 24, n=3), cu(0.08, 25)]
    wrapped = UncertaintyModel(lj(), bank)
    converged = ts.generate_force_convergence_fn(force_tol=0.5, include_cell_forces=False)
    batcher = ts.InFlightAutoBatcher(wrapped, memory_scales_with="n_atoms", max_memory_scaler=110)
    final = ts.optimize(
        sizes, wrapped, optimizer=FIRE, convergence_fn=converged, max_steps=300,
        autobatcher=batcher,
    )  # fmt: skip
    assert torch.bincount(final.system_idx, minlength=3).tolist() == [32, 108, 32]
    out = wrapped(final)
    top = torch.zeros(3, dtype=F64).index_reduce(
        0, final.system_idx, out["forces"].norm(dim=-1), "amax"
    )
    assert bool((top < 0.5).all()), top
    # against a bank that has not followed the run, and the run's own bank called again on
    # this state (its second call builds a neighbour list from the state's expanded pbc:
    # vesin-torch once read past that stride-0 flag and lost pairs, 130 nats off, in about
    # half of the runs; tests/test_descriptors.py::test_vesin_pairs_with_an_expanded_pbc)
    fresh = UncertaintyBank.from_descriptors(bank.descriptors, k=K, cutoff=CUTOFF, h=bank.h)
    torch.testing.assert_close(out["dH"], bank_dh(fresh, final), rtol=0, atol=1e-12)
    for _ in range(2):
        torch.testing.assert_close(bank_dh(bank, final), out["dH"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- EntropyBiasModel
BIAS_OPTIONS = [
    {"strength": 0.1},
    {"strength": 0.05, "reduction": "softmax", "beta": 2.0, "saturation": 5.0},
    {"strength": 0.02, "entropy_strength": 0.03},
]


@pytest.mark.parametrize("options", BIAS_OPTIONS, ids=["mean", "softmax-sat", "entropy"])
def test_bias_model_equals_the_ase_calculator(bank, systems, state, options):
    model = EntropyBiasModel(None, bank, compute_stress=True, **options)
    out = model(state)
    calc = EntropyBiasCalculator(bank, **options)
    n = len(systems[0])
    for s, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = calc
        rows = slice(s * n, (s + 1) * n)
        assert float(out["energy"][s]) == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(out["forces"][rows].numpy(), atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(
            out["stress"][s].numpy(), voigt_6_to_full_3x3_stress(atoms.get_stress()), atol=1e-10
        )
        np.testing.assert_allclose(out["dH"][rows].numpy(), calc.results["dH"], atol=1e-12)
        assert float(out["bias_f"][s]) == pytest.approx(calc.results["bias_f"], abs=1e-12)


def test_bias_forces_and_stress_are_finite_difference_derivatives(bank, systems):
    st = ts.io.atoms_to_state(systems[1:], CPU, F64)
    model = EntropyBiasModel(
        None,
        bank,
        0.1,
        reduction="softmax",
        saturation=8.0,
        entropy_strength=0.05,
        compute_stress=True,
    )
    out = model(st)

    def energy(positions, cell_rows):
        t = {
            "positions": positions,
            "cell": cell_rows.mT,
            "pbc": True,
            "system_idx": st.system_idx,
            "atomic_numbers": st.atomic_numbers,
        }
        return model.bias(t, forces=False)["energy"]

    rows = st.cell.mT
    d = 1e-5
    for atom, axis in [(0, 0), (5, 2), (40, 1)]:
        s = int(st.system_idx[atom])
        fd = -central_difference(lambda p, s=s: energy(p, rows)[s], st.positions, (atom, axis), d)
        assert float(out["forces"][atom, axis]) == pytest.approx(float(fd), abs=1e-6)

    def strained(eps):  # positions and cell rows times (1 + eps), per system
        deform = torch.eye(3, dtype=F64) + eps
        return energy((st.positions[:, :, None] * deform[st.system_idx]).sum(-2), rows @ deform)

    volume = torch.linalg.det(rows).abs()
    for a, b in [(0, 0), (2, 2), (0, 1), (1, 2)]:
        eps = torch.zeros(2, 3, 3, dtype=F64)
        eps[:, a, b] = eps[:, b, a] = d  # symmetric strain: 2 sigma_ab off the diagonal
        fd = (strained(eps) - strained(-eps)) / (2 * d) / volume / (1 if a == b else 2)
        torch.testing.assert_close(out["stress"][:, a, b], fd, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(out["stress"][:, a, b], out["stress"][:, b, a])


def test_bias_model_adds_the_bias_to_the_wrapped_model(bank, state):
    model = lj()
    biased = EntropyBiasModel(model, bank, 0.1)
    assert biased.compute_stress is True  # the wrapped model's
    out, ref = biased(state), model(state)
    bias = EntropyBiasModel(None, bank, 0.1, compute_stress=True).bias(state, stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], ref[key] + bias[key], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["bias_energy"], bias["energy"], rtol=0, atol=1e-12)


def test_biased_replicas_run_batched_in_integrate(bank, systems):
    biased = EntropyBiasModel(lj(compute_stress=False), bank, 0.05, saturation=5.0)
    final = ts.integrate(
        systems, biased, integrator=NVT, n_steps=4, temperature=300.0, timestep=0.002
    )
    assert final.n_systems == 3 and torch.isfinite(final.positions).all()


# ---------------------------------------------------------------------------- reporting
def test_reporter_properties_record_per_system_dh(bank, state):
    props = uncertainty_properties(bank, threshold=0.5)
    reporter = ts.TrajectoryReporter(None, prop_calculators={2: props})
    got = reporter.report(state, 2, model=lj())
    dh = bank_dh(bank, state)
    ref = per_structure_summary(dh, state.system_idx, 3, 0.5)
    assert len(got) == 3
    for s, row in enumerate(got):
        torch.testing.assert_close(row["max_dH"], ref.max_dH[s : s + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(row["mean_dH"], ref.mean_dH[s : s + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(row["fraction_above"], ref.fraction_above[s : s + 1])
    assert reporter.report(state, 3, model=lj()) == [{}, {}, {}]  # not a multiple of 2


def test_reporter_records_during_integrate_to_files(bank, systems, tmp_path):
    files = [tmp_path / f"s{i}.h5" for i in range(3)]
    wrapped = UncertaintyModel(lj(), bank)
    props = uncertainty_properties()  # bank taken from the model
    ts.integrate(
        systems,
        wrapped,
        integrator=NVT,
        n_steps=4,
        temperature=100.0,
        timestep=0.002,
        trajectory_reporter={
            "filenames": files,
            "state_frequency": 2,
            "prop_calculators": {2: props},
            "trajectory_kwargs": {"coerce_to_float32": False},
        },
    )
    # torch-sim >= 0.5.1 also writes the initial state, at step 0
    steps = [0, 2, 4] if TS_VERSION >= (0, 5, 1) else [2, 4]
    for s, path in enumerate(files):
        with ts.TorchSimTrajectory(path, mode="r") as traj:
            values = traj.get_array("max_dH")
            assert list(traj.get_steps("max_dH")) == steps
            assert list(traj.get_steps("positions")) == steps
            positions = traj.get_array("positions")
        for frame, value in zip(positions, values, strict=True):
            rows = torch.as_tensor(systems[s].cell.array)
            dh = bank(torch.as_tensor(frame, dtype=F64), rows, torch.ones(1, 3, dtype=torch.bool))
            assert float(value[0]) == pytest.approx(float(dh.max()), abs=1e-12)


def test_reporter_without_a_bank_needs_an_uncertainty_model(state):
    props = uncertainty_properties()
    with pytest.raises(ValueError, match="no bank"):
        props["max_dH"](state, lj())


# ---------------------------------------------------------------------------- batched runs
def initial_max(bank, systems):
    st = ts.io.atoms_to_state(systems, CPU, F64)
    return per_structure_summary(bank_dh(bank, st), st.system_idx, 3).max_dH


def run(bank, systems, action, **kw):
    top = initial_max(bank, systems)
    threshold = float(top[1] + top[2]) / 2  # only system 2 is above
    return threshold, run_with_uncertainty(
        systems,
        lj(),
        bank=bank,
        integrator=NVT,
        n_steps=4,
        temperature=[5.0, 5.0, 5.0],
        timestep=0.001,
        threshold=threshold,
        action=action,
        check_every=2,
        **kw,
    )


def test_run_flags_systems_above_the_threshold(bank, systems):
    threshold, res = run(bank, systems, "flag")
    assert res.steps == [0, 2, 4] and res.systems == [0, 1, 2]
    assert res.state.n_systems == 3 and res.dropped == []
    assert res.max_dH.shape == (3, 3) and res.mean_dH.shape == (3, 3)
    assert res.flagged == [2]
    assert all(s == 2 and m > threshold for _, s, m in res.events)
    assert res.events[0][:2] == (0, 2)  # it may relax below the threshold later
    torch.testing.assert_close(res.max_dH[0], initial_max(bank, systems).double())


def test_run_drops_systems_and_continues_with_the_others(bank, systems):
    threshold, res = run(bank, systems, "drop")
    assert res.systems == [0, 1] and res.state.n_systems == 2
    (gone,) = res.dropped
    assert gone.system == 2 and gone.step == 0 and gone.max_dH > threshold
    np.testing.assert_allclose(gone.state.positions.numpy(), systems[2].positions, atol=1e-12)
    assert torch.isnan(res.max_dH[1:, 2]).all() and torch.isfinite(res.max_dH[:, :2]).all()


def test_run_raises_naming_the_systems(bank, systems):
    with pytest.raises(BatchExtrapolationError, match=r"systems 2 \(max dH") as err:
        run(bank, systems, "raise")
    assert isinstance(err.value, ExtrapolationError)
    assert err.value.systems == [2] and err.value.step == 0
    assert err.value.dH.shape == (32,) and len(err.value.atoms) == 1


def test_run_per_system_temperatures_as_many_systems_as_steps(bank, systems):
    """One temperature per system when the running systems are as many as the steps between
    checks (2 and 2): torch-sim 0.6 reads [n_steps, n_systems] temperatures as ambiguous
    there. System 0 at 1 K, system 1 at 3000 K: each keeps its own."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_with_uncertainty(
            systems[:2],
            lj(),
            bank=bank,
            integrator=NVT,
            n_steps=4,
            temperature=[1.0, 3000.0],
            timestep=0.001,
            threshold=1e9,
            check_every=2,
        )
    assert not [w for w in caught if "n_steps" in str(w.message)]
    st = res.state
    kinetic = (st.momenta**2).sum(-1) / (2 * st.masses)
    per_system = torch.zeros(2, dtype=F64).index_add(0, st.system_idx, kinetic)
    kelvin = 2 * per_system / (3 * 32 * 8.617333262e-5)
    assert kelvin[0] < 100 and kelvin[1] > 1000, kelvin


def test_run_drops_systems_that_carry_the_models_outputs(bank, systems):
    """Driven by an UncertaintyModel, the state carries dH (torch-sim 0.6 keeps outputs on it):
    dropping a system splits them with it."""
    threshold = float(initial_max(bank, systems)[1:].mean())
    res = run_with_uncertainty(
        systems,
        UncertaintyModel(lj(), bank),
        integrator=NVT,
        n_steps=4,
        temperature=5.0,
        timestep=0.001,
        threshold=threshold,
        action="drop",
        check_every=2,
    )
    assert res.systems == [0, 1] and [d.system for d in res.dropped] == [2]
    assert res.state.n_systems == 2 and torch.isfinite(res.state.positions).all()


def test_run_takes_the_bank_of_an_uncertainty_model(bank, systems):
    res = run_with_uncertainty(
        systems[:2],
        UncertaintyModel(lj(), bank),
        integrator=NVT,
        n_steps=2,
        temperature=10.0,
        timestep=0.001,
        threshold=1e9,
        check_every=1,
    )
    assert res.steps == [0, 1, 2] and res.events == []


def test_dropping_every_system_ends_the_run(bank, systems):
    res = run_with_uncertainty(
        systems,
        lj(),
        bank=bank,
        integrator=NVT,
        n_steps=4,
        temperature=10.0,
        timestep=0.001,
        threshold=-1e9,
        action="drop",
    )
    assert res.state is None and res.systems == [] and len(res.dropped) == 3
    assert res.steps == [0]


# ---------------------------------------------------------------------------- bad input
def test_model_and_bank_must_share_dtype_and_device(bank):
    with pytest.raises(ValueError, match=r"`model` computes in torch\.float32 but `bank`"):
        UncertaintyModel(lj(dtype=torch.float32), bank)
    with pytest.raises(ValueError, match="`model` is on meta but `bank` is on cpu"):
        UncertaintyModel(lj(device=torch.device("meta")), bank)
    with pytest.raises(ValueError, match="`model` computes in"):
        EntropyBiasModel(lj(dtype=torch.float32), bank)


def test_bank_parameters_are_checked(bank):
    with pytest.raises(ValueError, match="`bank` was built with k=8 but k=32 was expected"):
        UncertaintyModel(lj(), bank, k=32)
    with pytest.raises(ValueError, match=r"`bank` was built with cutoff=4\.0 but cutoff=5\.0"):
        EntropyBiasModel(None, bank, cutoff=5.0)
    with pytest.raises(ValueError, match="k=8 but k=16"):
        uncertainty_properties(bank, k=16)
    with pytest.raises(TypeError, match="`bank` must be an UncertaintyBank"):
        UncertaintyModel(lj(), "bank.npz")
    with pytest.raises(ValueError, match="`bank` is empty"):
        UncertaintyModel(lj(), UncertaintyBank(k=K, cutoff=CUTOFF))


def test_species_unknown_to_a_multicomponent_bank(systems):
    ref = cu(0.04, 1)
    ref.symbols[:8] = "Ag"
    bank = UncertaintyBank.from_atoms(ref, k=K, cutoff=CUTOFF, species=["Cu", "Ag"])
    wrapped = UncertaintyModel(lj(), bank)
    ok = cu(0.03, 2)
    ok.symbols[:4] = "Ag"
    assert wrapped(ts.io.atoms_to_state([ok], CPU, F64))["dH"].shape == (32,)
    bad = cu(0.03, 3)
    bad.symbols[:2] = "Au"
    with pytest.raises(ValueError, match=r"`state.atomic_numbers` holds species \[79\]"):
        wrapped(ts.io.atoms_to_state([bad], CPU, F64))


def test_other_bad_arguments(bank, systems):
    with pytest.raises(TypeError, match="`model` must be a torch-sim model"):
        UncertaintyModel(torch.nn.Linear(3, 3), bank)
    with pytest.raises(TypeError, match="`threshold` must be a float"):
        UncertaintyModel(lj(), bank, threshold=True)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        EntropyBiasModel(None, bank, reduction="max")
    with pytest.raises(ValueError, match="wrapped `model` does not compute stress"):
        EntropyBiasModel(lj(compute_stress=False), bank, compute_stress=True)

    def run(**changes):
        kwargs = {"n_steps": 1, "temperature": 1.0, "timestep": 0.001, "threshold": 0.0}
        run_with_uncertainty(systems, lj(), bank=bank, integrator=NVT, **kwargs | changes)

    with pytest.raises(ValueError, match="`action` must be one of"):
        run(action="stop")
    with pytest.raises(ValueError, match="`temperature` must be a float or one per system"):
        run(temperature=[1.0, 2.0])
    with pytest.raises(ValueError, match="`check_every` must be an int >= 1"):
        run(check_every=0)
    open_state = ts.io.atoms_to_state([systems[0]], CPU, F64)
    open_state.pbc = False
    with pytest.raises(ValueError, match=r"`state\.pbc` must be fully periodic"):
        EntropyBiasModel(None, bank, compute_stress=True)(open_state)


# ---------------------------------------------------------------------------- packaging
def test_import_quests_torch_does_not_import_torch_sim():
    code = "import sys, quests_torch; assert 'torch_sim' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torch_sim_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_sim", None)
    monkeypatch.delitem(sys.modules, "quests_torch.integrations.torch_sim")
    with pytest.raises(ImportError, match=r"pip install quests-torch\[mlip\]"):
        importlib.import_module("quests_torch.integrations.torch_sim")


def test_dh_has_no_graph_unless_asked(bank, state):
    """An MLIP switches requires_grad on for the positions (forces): the monitor must not
    build a graph through the descriptors, unless differentiable=True."""
    state.positions.requires_grad_(True)
    out = UncertaintyModel(lj(), bank)(state)
    assert not out["dH"].requires_grad
    diff = UncertaintyModel(lj(), bank, differentiable=True)(state)
    assert diff["dH"].requires_grad
    (g,) = torch.autograd.grad(diff["dH"].sum(), state.positions)
    assert torch.isfinite(g).all()
    assert torch.allclose(out["dH"], diff["dH"].detach(), rtol=0, atol=1e-10)
