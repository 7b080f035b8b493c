"""dH next to NequIP through torch-sim (torch-sim >= 0.6, nequip >= 0.19; `make test-ts06-nequip`).

nequip 0.19 needs e3nn >= 0.6 and mace-torch pins e3nn 0.4.4, so this runs in its own
environment. The model is built here from nequip's own builder (``NequIPGNNModel``, random
weights from a fixed seed: nothing is trained or downloaded) and wrapped by torch-sim's NequIP
interface (``torch_sim.models.nequip_framework.NequIPFrameworkModel``, nequip's
``NequIPTorchSimCalc``) in :class:`~quests_torch.integrations.torch_sim.UncertaintyModel`.
Checked: the model's outputs are unchanged, dH is the bank's on the same state, torch-sim's
own model validation passes, ``run_with_uncertainty`` flags the system heated far above the
others, and the uncertainty guide's NequIP example runs (a ```py block: the main suite, which
runs the guide's ```python blocks, has no nequip).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("nequip")
ts = pytest.importorskip("torch_sim")
nequip_framework = pytest.importorskip("torch_sim.models.nequip_framework")

from ase.build import bulk  # noqa: E402
from nequip.integrations.utils import basic_transforms  # noqa: E402
from nequip.model import NequIPGNNModel  # noqa: E402
from nequip.utils.global_state import set_global_state  # noqa: E402

from quests_torch import UncertaintyBank  # noqa: E402
from quests_torch.integrations.torch_sim import UncertaintyModel, run_with_uncertainty  # noqa: E402
from quests_torch.uncertainty import per_structure_summary  # noqa: E402

F64 = torch.float64
CPU = torch.device("cpu")
K, CUTOFF = 8, 4.0
# torch-sim's validate_model_outputs evaluates Si, Mg, Fe cells and benzene: the model knows them
TYPES = ["C", "Cu", "Fe", "H", "Mg", "Si"]


def nequip_model(dtype: str = "float64", **sizes) -> nequip_framework.NequIPFrameworkModel:
    """A NequIP of random weights (seed 7) in torch-sim, with nequip's own input transforms
    (species to types, neighbour list)."""
    set_global_state()
    options = {"num_layers": 2, "l_max": 1, "num_features": 8, "radial_mlp_width": 16} | sizes
    graph = NequIPGNNModel(
        seed=7,
        model_dtype=dtype,
        r_max=4.5,
        type_names=TYPES,
        avg_num_neighbors=40.0,
        per_type_energy_shifts=0.0,
        per_type_energy_scales=1.0,
        **options,
    ).eval()
    transforms = basic_transforms(graph.metadata, 4.5, TYPES, {t: t for t in TYPES})
    return nequip_framework.NequIPFrameworkModel(model=graph, device=CPU, transforms=transforms)


def cu(rattle: float, seed: int, n: int = 2):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def model():
    return nequip_model()


@pytest.fixture(scope="module")
def bank():
    return UncertaintyBank.from_atoms([cu(0.04, s) for s in range(4)], k=K, cutoff=CUTOFF)


@pytest.fixture(scope="module")
def systems():
    return [cu(0.03, 10), cu(0.06, 11), cu(0.25, 12)]


def bank_dh(bank, st):
    """The contract: the bank on the state's tensors, cell transposed to rows."""
    pbc = torch.as_tensor(st.pbc, dtype=torch.bool).expand(st.cell.shape[0], 3)
    return bank(st.positions, st.cell.mT, pbc, st.system_idx)


def test_outputs_are_the_models_plus_bank_dh(model, bank, systems):
    state = ts.io.atoms_to_state(systems, CPU, F64)
    wrapped = UncertaintyModel(model, bank, threshold=0.5)
    out, ref = wrapped(state), model(state)
    assert set(ref) == {"energy", "forces", "stress"}
    assert ref["forces"].abs().max() > 1e-3  # a model that computes something
    for key, value in ref.items():
        torch.testing.assert_close(out[key], value, rtol=0, atol=0)
    dh = bank_dh(bank, state)
    torch.testing.assert_close(out["dH"], dh, rtol=0, atol=1e-12)
    summary = per_structure_summary(dh, state.system_idx, 3, 0.5)
    torch.testing.assert_close(out["max_dH"], summary.max_dH, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["fraction_above"], summary.fraction_above)
    assert out["max_dH"][2] > out["max_dH"][1] > out["max_dH"][0]
    assert wrapped.device == model.device and wrapped.dtype == F64
    assert wrapped.compute_stress is True and wrapped.memory_scales_with == "n_atoms_x_density"


def test_passes_torch_sims_model_validation(model, bank):
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(UncertaintyModel(model, bank), CPU, F64)


def test_run_with_uncertainty_flags_the_hot_system(model, bank, systems):
    """Three cells near the bank, at 10, 10 and 20,000 K: only the hot one leaves the
    reference environments (measured: the cold ones' max dH stays between -3.5 and -2.6 nats,
    the hot one's reaches 304 nats after 10 steps, the random model's forces pushing it
    apart; threshold about 0)."""
    start = [cu(0.03, 30 + i) for i in range(3)]
    wrapped = UncertaintyModel(model, bank)
    state0 = ts.io.atoms_to_state(start, CPU, F64)
    top0 = per_structure_summary(bank_dh(bank, state0), state0.system_idx, 3).max_dH
    threshold = float(top0.max()) + 3.0
    torch.manual_seed(0)
    run = run_with_uncertainty(
        start,
        wrapped,
        integrator=ts.Integrator.nvt_langevin,
        n_steps=20,
        temperature=[10.0, 10.0, 20000.0],
        timestep=0.002,
        threshold=threshold,
        action="flag",
        check_every=10,
    )
    assert run.steps == [0, 10, 20] and run.max_dH.shape == (3, 3)
    assert run.flagged == [2]
    assert float(run.max_dH[1:, :2].max()) < threshold
    assert float(run.max_dH[-1, 2]) > threshold + 5.0
    # on the final state: outputs of the model unchanged, dH the bank's
    out, ref = wrapped(run.state), model(run.state)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    fresh = UncertaintyBank.from_descriptors(bank.descriptors, k=K, cutoff=CUTOFF, h=bank.h)
    torch.testing.assert_close(out["dH"], bank_dh(fresh, run.state), rtol=1e-13, atol=1e-12)


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "uncertainty.md"


def test_the_guides_nequip_example_runs(bank):
    text = GUIDE.read_text()
    start = text.index("## NequIP through torch-sim")
    (block,) = re.finditer(r"```py\n(.*?)```", text[start:], flags=re.S)
    line = text.count("\n", 0, start + block.start(1)) + 1
    namespace = {"UncertaintyModel": UncertaintyModel, "bank": bank}
    exec(compile("\n" * (line - 1) + block.group(1), str(GUIDE), "exec"), namespace)
    watched = namespace["watched"]
    state = ts.io.atoms_to_state([cu(0.03, 1)], CPU, F64)
    out = watched(state)
    torch.testing.assert_close(out["dH"], bank_dh(bank, state), rtol=0, atol=1e-12)
    assert torch.isfinite(out["forces"]).all() and out["energy"].shape == (1,)
