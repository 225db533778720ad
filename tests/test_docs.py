"""The user guide stays true to the code: links resolve, named configs exist, documented commands compose, and the
SLURM scripts launch DDP with overrides that compose into the right Trainer (docs/README.md, experiments/README.md)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import CONF, REPO, compose

DOCS = REPO / "docs"
GUIDE = DOCS / "guide"
EXPERIMENTS_INDEX = REPO / "experiments" / "README.md"
PAGES = sorted(DOCS.rglob("*.md")) + [EXPERIMENTS_INDEX]
SBATCH = {"slurm_evaluate.sbatch": "evaluate", "slurm_train.sbatch": "train"}
GROUPS = ("experiment", "prior", "solver", "operator", "data", "trainer", "logger", "sampling_grid", "task", "model")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# `group=value` as a command-line override: not part of a longer key (data_dir=, +trainer.x=, prior.path=)
GROUP_VALUE = re.compile(r"(?<![\w.+~/-])(" + "|".join(GROUPS) + r")=([A-Za-z_]\w*)")
ENTRY_POINT = re.compile(r"(?:^|\s)(?:\S*/)?(evaluate|train)\.py(\s.*)?$")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def relative_links(page: Path) -> list[str]:
    """Link targets of a Markdown page that point into the repository (no URLs, no pure anchors)."""
    targets = [t for t in LINK.findall(page.read_text()) if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]
    return [t.split("#", 1)[0] for t in targets]


def group_values(text: str) -> set[tuple[str, str]]:
    return set(GROUP_VALUE.findall(text))


def joined_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined (shell scripts and code blocks)."""
    return text.replace("\\\n", " ").splitlines()


def _command(config_name: str, argument_text: str) -> tuple[str, list[str]] | None:
    """(config name, overrides) of one command line; None for an elided one (``train.py ...``) or a template whose
    group value is a placeholder (``solver=<name>``)."""
    # <run>, <output_dir>, ...: placeholders the reader replaces (Hydra's grammar refuses "<")
    args = [re.sub(r"<[^<>\s]+>", "placeholder", a) for a in shlex.split(argument_text)]
    args = [a for a in args if a not in ("--cfg", "job")]
    if "..." in args or any(re.fullmatch(rf"({'|'.join(GROUPS)})=placeholder", a) for a in args):
        return None  # elided (error message quotes) or a template
    return config_name, args


def documented_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every ``evaluate.py`` / ``train.py`` command of the page: the lines of its code
    blocks and its inline code spans (which may wrap across lines)."""
    text, commands, in_block = page.read_text(), [], False
    for line in joined_lines(text):
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        match = ENTRY_POINT.search(line.split("#", 1)[0]) if in_block else None
        if match:
            commands.append(_command(match.group(1), match.group(2) or ""))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        match = ENTRY_POINT.search(" ".join(span.split()))
        if match:
            commands.append(_command(match.group(1), match.group(2) or ""))
    return [c for c in commands if c is not None]


def sbatch_srun(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(#SBATCH options, the srun command's words before the entry point, its overrides with the SLURM and shell
    variables substituted as SLURM would set them for this header)."""
    text = path.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    env = {
        "SLURM_JOB_NUM_NODES": options["nodes"],
        "SLURM_NTASKS_PER_NODE": options["ntasks-per-node"],
        "SLURM_CPUS_PER_TASK": options.get("cpus-per-task", "1"),
    }
    env.update(re.findall(r"^([A-Z_]+)=(\S+)$", text, flags=re.M))
    srun = [line for line in joined_lines(text) if line.strip().startswith("srun ")]
    assert len(srun) == 1, f"{path.name}: expected one srun line, found {len(srun)}"
    words = shlex.split(srun[0])
    entry = next(i for i, w in enumerate(words) if w.endswith(".py"))
    overrides = [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], w) for w in words[entry + 1 :]]
    return options, words[: entry + 1], overrides


def test_every_relative_link_resolves():
    broken = [f"{_rel(p)}: {t}" for p in PAGES for t in relative_links(p) if not (p.parent / t).exists()]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_every_mentioned_experiment_and_group_option_exists():
    texts = {p: p.read_text() for p in PAGES + sorted(GUIDE.glob("*.sbatch"))}
    missing = [
        f"{_rel(p)}: {group}={value}"
        for p, text in texts.items()
        for group, value in sorted(group_values(text))
        if not (CONF / group / f"{value}.yaml").is_file()
    ]
    assert not missing, "options without a config file:\n" + "\n".join(missing)
    mentioned = {v for text in texts.values() for g, v in group_values(text) if g == "experiment"}
    assert {"daps_sr4", "padis_ct", "gmm_table"} <= mentioned  # the scan finds what the pages say


def test_group_value_scan_ignores_longer_keys():
    text = "paths.data_dir=x +trainer.max_time=1 prior.path=p data=train_images `experiment=gmm_dps` logger=<name>"
    assert group_values(text) == {("data", "train_images"), ("experiment", "gmm_dps")}


def test_every_experiment_table_is_linked_from_the_index():
    linked = {(EXPERIMENTS_INDEX.parent / t).resolve() for t in relative_links(EXPERIMENTS_INDEX)}
    # local outputs the .gitignore keeps out of the repository (experiments/*/runs/ of the demos) are not tables
    ignored = [REPO / line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip().startswith("experiments/")]
    tables = [p for p in sorted(EXPERIMENTS_INDEX.parent.rglob("*.md"))
              if p.name != "README.md" and not any(p.is_relative_to(d) for d in ignored)]
    assert len(tables) > 10
    unlinked = [_rel(p) for p in tables if p.resolve() not in linked]
    assert not unlinked, "tables missing from experiments/README.md:\n" + "\n".join(unlinked)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_documented_command_composes(page, tmp_path):
    commands = documented_commands(page)
    for config_name, overrides in commands:
        if not any(o.startswith("paths.output_dir=") for o in overrides):
            overrides = [*overrides, f"paths.output_dir={tmp_path}"]
        try:
            compose(config_name, overrides)
        except Exception as err:  # noqa: BLE001 - name the command that does not compose
            pytest.fail(f"{page.name}: `{config_name}.py {' '.join(overrides)}` does not compose: {err}")


def test_the_guide_pages_with_commands_are_scanned():
    counts = {p.name: len(documented_commands(p)) for p in sorted(GUIDE.glob("*.md"))}
    for name in ("train_your_prior.md", "public_checkpoints.md", "multi_gpu.md", "wandb.md"):
        assert counts[name] >= 2, counts


@pytest.mark.parametrize("script", sorted(SBATCH))
def test_sbatch_script_runs_ddp_through_srun_with_overrides_that_compose(script, tmp_path):
    options, launcher, overrides = sbatch_srun(GUIDE / script)
    config_name = SBATCH[script]
    assert launcher[0] == "srun" and launcher[-1] == f"{config_name}.py", launcher
    nodes, tasks = int(options["nodes"]), int(options["ntasks-per-node"])
    assert int(options["gpus-per-node"]) == tasks, "one srun task per GPU"
    assert nodes > 1, "the example is multi-node"
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    assert values["trainer.num_nodes"] == str(nodes) and values["trainer.devices"] == str(tasks)
    # every rank writes into one directory: Hydra's per-process timestamp is replaced by a fixed path
    assert values["hydra.run.dir"] == values["paths.output_dir"]
    overrides = [o for o in overrides if not o.startswith("paths.output_dir=")] + [f"paths.output_dir={tmp_path}"]
    cfg = compose(config_name, overrides)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.num_nodes == nodes and cfg.trainer.devices == tasks
    assert cfg.get("experiment") is None and cfg.task_name == values["experiment"]
