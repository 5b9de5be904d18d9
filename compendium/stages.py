"""The pipeline's stages and the runner that executes one with papermill.

A stage run: validate the profile (before any work), execute the stage's
notebook with papermill into a private staging folder, write the stage's
manifest there, then swap the staging folder into place as
`build/<profile>/<stage>/`. The executed notebook is kept under
`build/<profile>/notebooks/` with its HTML rendering. A failed run leaves the
previous artifacts untouched and no partial folder behind; the failed
notebook goes to `build/<profile>/logs/` for diagnosis.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from compendium import artifacts
from compendium.params import build_name, load_params, profile_path
from compendium.paths import BUILD_ROOT, REPO_ROOT

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its notebook, the sources it runs, the stages it reads.

    This table is the pipeline's only declaration: `make` reads its rules from
    it (`python -m compendium make-rules`, see `compendium/makerules.py`) and
    every manifest lists the same sources as inputs.
    """

    name: str
    title: str
    #: Python packages whose modules the stage runs (a change to any makes the stage stale).
    packages: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    #: Other source files, as globs from the repository root (templates, texts).
    assets: tuple[str, ...] = ()
    #: Make targets that must have run first but whose age does not matter (tools such as Chromium).
    tools: tuple[str, ...] = ()

    @property
    def notebook(self) -> Path:
        return REPO_ROOT / "notebooks" / f"{self.name}.ipynb"


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("01_synthetic_ehr", "Synthetic EHR and cohort", ("data_synth", "compendium")),
        Stage("02_local_baselines", "Local baselines and references", ("fl", "data_synth", "compendium"),
              upstream=("01_synthetic_ehr",)),
        Stage("03_federated_training", "Federated training with Flower", ("fl", "data_synth", "compendium"),
              upstream=("01_synthetic_ehr", "02_local_baselines")),
        Stage("04_privacy_evaluation", "Privacy evaluation", ("fl", "data_synth", "compendium"),
              upstream=("01_synthetic_ehr", "03_federated_training")),
        Stage("05_report", "The pilot report", ("report", "compendium"),
              upstream=("01_synthetic_ehr", "02_local_baselines", "03_federated_training", "04_privacy_evaluation"),
              assets=("report/templates/*", "report/text/*", "report/*.yaml"), tools=("chromium",)),
    )
}
#: Stage 1 is the synthetic generator, or, on a provided dataset, its data card; later stages read either.
SYNTHETIC_STAGE, DATA_CARD_STAGE = "01_synthetic_ehr", "01_data_card"
DATA_CARD = Stage(DATA_CARD_STAGE, "Data card of the provided data", ("data_synth", "fl", "compendium"))
#: Every stage that can run: the synthetic pipeline (STAGES) and the data card.
ALL_STAGES: dict[str, Stage] = {DATA_CARD_STAGE: DATA_CARD, **STAGES}


def pipeline(provided: bool) -> list[str]:
    """Return the stages in order for synthetic or provided data."""
    return [DATA_CARD_STAGE, *list(STAGES)[1:]] if provided else list(STAGES)


def upstream_of(stage: Stage, provided: bool) -> list[str]:
    """Return the stages `stage` reads, with stage 1 named as it is on synthetic or provided data."""
    return [DATA_CARD_STAGE if provided and name == SYNTHETIC_STAGE else name for name in stage.upstream]


def mermaid() -> str:
    """Return the stage graph as a Mermaid flowchart (docs/architecture.md shows it; a test keeps them equal)."""
    lines = ["flowchart LR"]
    for stage in ALL_STAGES.values():
        lines.append(f'    stage{stage.name}["{stage.name}<br/>{stage.title}"]')
    for stage in ALL_STAGES.values():
        for upstream in stage.upstream:
            lines.append(f"    stage{upstream} --> stage{stage.name}")
    lines += [f"    stage{DATA_CARD_STAGE} -. provided data .-> stage{downstream}"
              for downstream in STAGES if SYNTHETIC_STAGE in STAGES[downstream].upstream]
    return "\n".join(lines)


class StageError(RuntimeError):
    """A stage could not run (missing upstream artifacts, a failed notebook)."""


def stage_dir(profile: str, stage: str, build_root: Path = BUILD_ROOT) -> Path:
    return Path(build_root) / profile / stage


def source_files(stage: Stage) -> list[Path]:
    """Return the files whose change makes the stage stale: notebook, package sources and assets."""
    files = [stage.notebook]
    for package in stage.packages:
        files.extend(sorted((REPO_ROOT / package).rglob("*.py")))
    for pattern in stage.assets:
        files.extend(sorted(path for path in REPO_ROOT.glob(pattern) if path.is_file()))
    return files


def run_stage(name: str, profile_name: str, build_root: Path = BUILD_ROOT, progress: bool = True,
              params_file: Path | None = None, data_file: Path | None = None) -> Path:
    """Run one stage for a profile and return its artifact folder.

    `params_file` defaults to params/<profile_name>.yaml; tests point it elsewhere.
    `data_file` (a dataset YAML) runs the stage on provided data; the build
    folder is then build/<profile>-<dataset file stem>/.
    """
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    if name not in ALL_STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {list(ALL_STAGES)}")
    stage = ALL_STAGES[name]
    params_file = Path(params_file) if params_file is not None else profile_path(profile_name)
    profile = load_params(params_file, data_file)  # fails here, before any work, on a bad profile or dataset
    dataset = profile.dataset
    if name not in pipeline(dataset is not None):
        raise StageError(f"stage {name} is not part of the pipeline on {'provided' if dataset else 'synthetic'} data; "
                         f"stages: {pipeline(dataset is not None)}")
    folder_name = build_name(profile_name, data_file)
    profile_root = Path(build_root) / folder_name
    make_hint = f"make all PROFILE={profile_name}" + (f" DATA={artifacts.relative(Path(data_file))}" if data_file else "")
    upstream_inputs = []
    for upstream in upstream_of(stage, dataset is not None):
        folder = profile_root / upstream
        if not (folder / MANIFEST).is_file():
            raise StageError(f"stage {name} needs {upstream} first: {artifacts.relative(folder)} has no "
                             f"{MANIFEST}; run `{make_hint}`")
        upstream_inputs.extend(artifacts.files_under(folder))
    dataset_inputs = []
    if dataset is not None:
        dataset_inputs = [dataset.path, *(dataset.input_files() if name == DATA_CARD_STAGE else [])]

    profile_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=profile_root))
    notebooks_dir = profile_root / "notebooks"
    started = time.perf_counter()
    try:
        executed_path = staging / f".{name}.executed.ipynb"
        try:
            offered = {"params_path": artifacts.relative(params_file), "output_dir": str(staging),
                       "build_dir": str(profile_root), "data_path": profile.data or ""}
            declared = papermill.inspect_notebook(str(stage.notebook))  # pass only these: no "unknown parameter" noise
            papermill.execute_notebook(
                str(stage.notebook), str(executed_path),
                parameters={key: value for key, value in offered.items() if key in declared},
                cwd=str(REPO_ROOT), progress_bar=progress, kernel_name="python3", log_output=False,
                kernel_manager_class="compendium.kernel.QuietKernelManager",
            )
        except papermill.PapermillExecutionError as error:
            log = profile_root / "logs" / f"{name}.failed.ipynb"
            log.parent.mkdir(parents=True, exist_ok=True)
            if executed_path.exists():
                shutil.copyfile(executed_path, log)
            raise StageError(f"stage {name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                             f"(the failed notebook is {artifacts.relative(log)})") from None
        wall = time.perf_counter() - started
        if not (staging / SUMMARY).is_file():
            raise StageError(f"stage {name} wrote no {SUMMARY}")
        outputs = [p for p in artifacts.files_under(staging)]
        record = artifacts.manifest(
            stage=name, profile=profile_name, seed=profile.seed,
            parameters=profile.model_dump(mode="json"),
            inputs=artifacts.file_records([params_file, *dataset_inputs, *source_files(stage), *upstream_inputs]),
            outputs=artifacts.file_records(outputs, root=staging),
            wall_seconds=wall,
        )
        artifacts.write_json(staging / MANIFEST, record)

        notebook = nbformat.read(executed_path, as_version=4)
        html, _ = HTMLExporter(embed_images=True).from_notebook_node(notebook)
        executed_path.unlink()
        notebooks_dir.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write(notebooks_dir / f"{name}.ipynb", lambda tmp: nbformat.write(notebook, tmp))
        artifacts.atomic_write(notebooks_dir / f"{name}.html", lambda tmp: tmp.write_text(html))
        artifacts.replace_folder(staging, stage_dir(folder_name, name, build_root))
        (profile_root / "logs" / f"{name}.failed.ipynb").unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stage_dir(folder_name, name, build_root)
