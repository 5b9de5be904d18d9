"""Federated model selection: the local-training settings and the number of rounds, chosen on training data.

Every candidate of the profile's grid (`federated.selection`: optimiser and
learning rate, local epochs, weight decay) runs as a real federation of the
pilot's Flower apps (FedAvg, the direct engine), in which every site trains
on its training split minus a held-out share and evaluates each round's
global model on that share. The server sees only each site's validation
loss and its count, as in any round. The example-weighted mean of those
losses is the federated validation loss; its lowest point over the rounds is
the early-stopping round, and the candidate with the lowest such loss wins.
No test row is read.

`selected_profile` gives the profile the later stages use: the chosen
settings in place of the profile's fixed ones. With selection off (or on a
build without a selection file) it is the profile itself.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from compendium.params import Profile
from fl.flower import engine

SELECTION_FILE = "selection.json"
FEDERATED = Path("03_federated_training")


@dataclass(frozen=True)
class Candidate:
    """One setting of local training the selection tries."""

    optimizer: str
    learning_rate: float
    local_epochs: int
    weight_decay: float

    @property
    def name(self) -> str:
        return f"{self.optimizer}_lr{self.learning_rate:g}_e{self.local_epochs}_wd{self.weight_decay:g}"


def candidates(profile: Profile) -> list[Candidate]:
    """Return the selection grid in a fixed order (optimiser, learning rate, local epochs, weight decay)."""
    grid = profile.federated.selection
    return [Candidate(optimizer, float(rate), int(epochs), float(decay))
            for optimizer in sorted(grid.learning_rates)
            for rate, epochs, decay in itertools.product(grid.learning_rates[optimizer], grid.local_epochs,
                                                         grid.weight_decays)]


def with_settings(profile: Profile, candidate: Candidate, rounds: int | None = None) -> Profile:
    """Return `profile` with `candidate`'s local-training settings (and `rounds`, if given)."""
    update = asdict(candidate)
    if rounds is not None:
        update["rounds"] = int(rounds)
    return profile.model_copy(update={"federated": profile.federated.model_copy(update=update)})


def validation_curve(history: list[dict]) -> list[float]:
    """Return per round the example-weighted mean over sites of the validation loss."""
    rounds: dict[int, list[tuple[float, int]]] = {}
    for row in history:
        rounds.setdefault(int(row["round"]), []).append((float(row["test_loss"]), int(row["examples"])))
    return [sum(loss * n for loss, n in rows) / sum(n for _, n in rows) for _, rows in sorted(rounds.items())]


def mean_drift(history: list[dict]) -> list[float]:
    """Return per round the mean over sites of the local models' distance from the new global model."""
    frame = pd.DataFrame(history)
    return frame.groupby("round")["drift"].mean().tolist() if "drift" in frame else []


@dataclass
class Selection:
    """The outcome: every candidate's validation curve, the chosen candidate and its early-stopping round."""

    table: pd.DataFrame  # one row per candidate: best round, best validation loss, final loss, drift
    curves: dict[str, list[float]]
    chosen: Candidate
    rounds: int

    def to_json(self) -> dict:
        return {"chosen": asdict(self.chosen), "name": self.chosen.name, "rounds": self.rounds,
                "candidates": self.table.reset_index().to_dict(orient="records"), "curves": self.curves}


def select(profile: Profile, site_dirs: list[Path], output_dir: Path) -> Selection:
    """Run every candidate as a FedAvg federation with federated validation and choose the best."""
    fraction = profile.federated.selection.validation_fraction
    rows, curves = [], {}
    for candidate in candidates(profile):
        result = engine.run_direct(with_settings(profile, candidate), "fedavg", site_dirs,
                                   Path(output_dir) / candidate.name, validation_fraction=fraction)
        curve = validation_curve(result.history)
        drift = mean_drift(result.history)
        best = min(range(len(curve)), key=curve.__getitem__)
        curves[candidate.name] = [round(v, 6) for v in curve]
        rows.append({"candidate": candidate.name, **asdict(candidate), "best_round": best + 1,
                     "validation_loss": round(curve[best], 6), "final_validation_loss": round(curve[-1], 6),
                     "final_drift": round(drift[-1], 6) if drift else None})
    table = pd.DataFrame(rows).set_index("candidate")
    # Ties (to 1e-6) go to the earlier candidate in the grid's fixed order.
    winner = table["validation_loss"].idxmin()
    chosen = next(c for c in candidates(profile) if c.name == winner)
    return Selection(table, curves, chosen, int(table.loc[winner, "best_round"]))


def save(selection: Selection, folder: Path) -> None:
    """Write `selection.json` (the choice, every candidate's row and validation curve)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / SELECTION_FILE).write_text(json.dumps(selection.to_json(), indent=1) + "\n")


def selected_profile(profile: Profile, build_dir: Path) -> Profile:
    """Return the profile with stage 3's chosen settings (the profile itself when selection is off)."""
    path = Path(build_dir) / FEDERATED / SELECTION_FILE
    if not profile.federated.selection.enabled or not path.exists():
        return profile
    saved = json.loads(path.read_text())
    return with_settings(profile, Candidate(**saved["chosen"]), saved["rounds"])
