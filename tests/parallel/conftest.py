"""The parallel layout tests share one torchrun job (helpers.run_layouts_job,
tests/parallel/layouts_worker.py): each job costs the start of 4 processes, their imports and
the group's set-up, a large part of the suite's time on CPU. Every test module that defines
`layouts_plan()` adds its runs and checks to it, in a folder of its own; only the modules with
a test selected in this session do."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import run_layouts_job, train_one_process


@dataclass
class LayoutsJob:
    folders: dict[str, Path]  # each module's runs, by module name
    plan: list[dict]  # every entry the job ran
    stdout: str


@pytest.fixture(scope="session")
def layouts_job(request, tmp_path_factory, byte_data) -> LayoutsJob:
    """layouts_plan() returns (references, plan): the one-process runs to train here, by name,
    with their overrides, and the job's entries (layouts_worker.py), names relative to the
    module's folder."""
    modules = {item.module.__name__: item.module for item in request.session.items
               if hasattr(item.module, "layouts_plan")}
    out = tmp_path_factory.mktemp("layouts")
    folders, plan = {}, []
    for name, module in sorted(modules.items()):
        folder = out / name.rpartition(".")[2]
        folders[name] = folder
        references, entries = module.layouts_plan()
        for run, overrides in references.items():
            train_one_process(byte_data, folder / run, overrides)
        for entry in entries:
            entry = {**entry, "name": f"{folder.name}/{entry['name']}"}
            if "resume_from" in entry:
                entry["resume_from"] = f"{folder.name}/{entry['resume_from']}"
            plan.append(entry)
    # 2026-11-26, 2 cores under a load average of 15 to 300 (other jobs): 13 minutes for every
    # module's entries; the separate jobs it replaced had 32 minutes of timeouts between them.
    stdout = run_layouts_job(byte_data, out, plan, timeout=1500)
    return LayoutsJob(folders, plan, stdout)
