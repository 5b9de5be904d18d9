"""Make rules for one profile, written from the stage table in `compendium/stages.py`.

The Makefile holds no stage graph of its own: it includes the file this
module writes (`python -m compendium make-rules`), so a stage added to
`STAGES` is a make target with the right prerequisites without touching the
Makefile. Each stage's target is its manifest; it depends on the notebook,
the package sources and assets the stage runs (`source_files`, the same list
its manifest records as inputs), the manifests of the stages it reads, and,
for stage 1, the profile and the provided dataset's files.
"""
from __future__ import annotations

from compendium import artifacts
from compendium.params import build_name, load_params, profile_path
from compendium.paths import REPO_ROOT
from compendium.stages import ALL_STAGES, MANIFEST, pipeline, source_files, upstream_of

HEADER = "# Written by `python -m compendium make-rules` from compendium/stages.py; do not edit (make rewrites it).\n"


def make_rules(profile_name: str, build_root: str, data_file: str | None = None) -> str:
    """Return the make rules that build every stage of the profile (on the provided dataset, if given).

    Defines BUILD (the profile's build folder), STAGE1..STAGEn (each stage's
    manifest, in pipeline order), FINAL_STAGE, the phony aliases stage1..stageN, and one
    rule per stage whose recipe is `$(PY) -m compendium run <stage> ...`.
    Raises ParamsError on a bad profile or dataset, before make does any work.
    """
    params_file = profile_path(profile_name)
    profile = load_params(params_file, data_file)
    dataset = profile.dataset
    build = f"{build_root.rstrip('/')}/{build_name(profile_name, data_file)}"
    run_args = f"--profile {profile_name} --build-root {build_root}" + (f" --data {data_file}" if data_file else "")
    manifest = {name: f"{build}/{name}/{MANIFEST}" for name in pipeline(dataset is not None)}
    stage1_inputs = [artifacts.relative(params_file)]
    if dataset is not None:
        stage1_inputs += [artifacts.relative(dataset.path), *(artifacts.relative(path) for path in dataset.input_files())]

    lines = [HEADER, f"BUILD := {build}"]
    for position, name in enumerate(manifest, start=1):
        lines.append(f"STAGE{position} := {manifest[name]}")
    lines.append(f"FINAL_STAGE := {list(manifest.values())[-1]}")
    lines.append(f"STAGE_TARGETS := {' '.join(f'stage{n}' for n in range(1, len(manifest) + 1))}")
    lines.append(".PHONY: $(STAGE_TARGETS)")
    for position, (name, target) in enumerate(manifest.items(), start=1):
        stage = ALL_STAGES[name]
        prerequisites = ["$(STAMP)", *(manifest[upstream] for upstream in upstream_of(stage, dataset is not None))]
        if position == 1:
            prerequisites += stage1_inputs
        prerequisites += [artifacts.relative(path) for path in source_files(stage)]
        order_only = f" | {' '.join(stage.tools)}" if stage.tools else ""
        lines += ["", f"stage{position}: {target}", "",
                  f"{target}: {' '.join(prerequisites)}{order_only}",
                  f"\t@$(PY) -m compendium run {name} {run_args}"]
    # A new source file or a changed dataset YAML must rewrite these rules. Folders are named with a
    # trailing slash: `report` alone is also a phony target, which would build the whole pipeline.
    watched = sorted({f"{path.parent.relative_to(REPO_ROOT)}/" for name in manifest
                      for path in source_files(ALL_STAGES[name])})
    if dataset is not None:
        watched.append(artifacts.relative(dataset.path))
    lines += ["", f"$(RULES): {' '.join(watched)}", ""]
    return "\n".join(lines)
