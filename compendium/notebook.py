"""What every stage notebook does first: find the repo, load the profile, prepare outputs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compendium import artifacts
from compendium.params import REPO_ROOT, Profile, load_params

FIGURE_DPI = 110


@dataclass
class StageContext:
    """The profile and output folders of one notebook run."""

    profile: Profile
    output_dir: Path
    build_dir: Path

    @property
    def figures_dir(self) -> Path:
        path = self.output_dir / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_figure(self, figure, name: str) -> None:
        """Save a matplotlib figure as figures/<name>.png (no timestamps in the file).

        Returns None so a notebook cell ending in this call shows the figure once.
        """
        path = self.figures_dir / f"{name}.png"
        figure.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight", metadata={"Software": None})

    def write_summary(self, summary: dict) -> Path:
        """Write the stage's headline figures to summary.json."""
        return artifacts.write_json(self.output_dir / "summary.json", summary)


def setup(params_path: str, output_dir: str, build_dir: str | None = None, data_path: str = "") -> StageContext:
    """Return the stage context: cwd at the repo root, profile validated (on the provided dataset
    `data_path` if given), output folder ready."""
    import seaborn as sns

    os.chdir(REPO_ROOT)
    profile = load_params(params_path, data_path or None)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
    build = Path(build_dir) if build_dir else output.parent
    return StageContext(profile=profile, output_dir=output, build_dir=build)

