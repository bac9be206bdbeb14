"""Every command of the README runs as written on a fresh clone, or is named with what it needs (issue 23).

Each command of README.md's and BUILD.md's ```bash blocks (`readme_commands.py` parses them) is one test, in file
order; the ones that run are marked slow, so the fast tier still fails on a command no rule classifies. RULES
classifies each, first match wins:
  RUN    it runs in a fresh clone of this checkout (HEAD plus the working tree's changes, no `../shared` beside it,
         `.venv` the venv running pytest, nothing installed or downloaded) with `bash -c`, one command
         after another in README order, so later commands use earlier outputs (`runs/tiny` from `make train`);
         the exit status must be 0. Selecting one case (`-k`) runs the commands before it first.
  SKIP   it cannot run on 2 CPU cores here: the reason names what it needs and what test covers it instead
         (pytest -rs lists them).
  XFAIL  it fails as written for a known reason (strict: once it passes, remove the entry).
A command no rule matches fails, asking for a rule: every future README command is either run or named.

What a RUN case changes before running, all listed here:
  - `/tmp/...` paths point into the walk's own temporary folder, so two walks on one machine (or an earlier run's
    leftovers, which `convert_hf.py` rightly refuses to overwrite) do not meet;
  - `_cheaper`: a run of `configs/tiny.py` (`make train` included) trains 4 steps instead of 800 (or up to the end
    of the train.profile_steps window it asks for).
The commands see a user's environment: XLA_FLAGS holds only XLA:CPU's compile options (COMPILE_FAST; conftest's 8
simulated devices are for in-process tests; a command that wants devices sets XLA_FLAGS itself, as the README's
do), JAX_PLATFORMS=cpu, HF_*_OFFLINE=1, no
PYTHONPATH (every script finds its own checkout). In `make test` the walk holds a worker for ~2.5 minutes on 2
cores shared with the other worker (~2 minutes of CPU, 2026-12-06); alone: `pytest -q tests/test_readme.py -rs`.
"""

import dataclasses
import functools
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import COMPILE_FLAGS, ROOT
from readme_commands import Command, commands

DOCS = ("README.md", "BUILD.md")
TIMEOUT_S = 300  # one command; the slowest run here takes ~1 minute on 2 busy cores
# XLA:CPU's compile options of the in-process tests (conftest.COMPILE_FLAGS: -O0, the older fusion emitters): the
# walk's programs compile in less CPU (a 4-step `make train` 14.9 -> 13.5 CPU-s); what they compute is the same to
# rounding. A command that sets XLA_FLAGS itself replaces them.
COMPILE_FAST = " ".join(COMPILE_FLAGS)

RUN, SKIP, XFAIL = "run", "skip", "xfail"
_SLOW_BENCH = "a benchmark: minutes on 2 cores (measured: `train --preset cpu-small --profile` 150 s, with " \
              "--compare-hf over 400 s); tests/test_benchmark.py runs the subcommand end to end on a tiny shape"
_BIG_COMPILE = "compiles GPT-NeoX-20B's train step for dozens of simulated devices: minutes on 2 cores; " \
               "tests/test_layout.py runs the same report (--compare, --plot) on a tiny model"

# (regex searched in the command, action, reason); first match wins. Match by pattern, not by exact text: the
# sections change under other hands, and a changed command should land in the same rule.
RULES = [
    (r"^make test\b", SKIP, "is this suite (tests/test_readme.py runs inside `make test`)"),
    (r"^(python3 -m venv|(\S*/)?pip install|make (setup|venv-\w+))\b", SKIP,
     "sets up a venv from PyPI (network; the CUDA / TPU ones for hardware not here); the venv these tests run in "
     "was set up the same way, and CI's .ci/run runs `make test` from a clean clone"),
    (r"preprocess_data\.py .*--slurm\b", SKIP, "submits a SLURM job array and a merge job to a cluster's shared "
     "/shared paths; tests/test_slurm.py::test_preprocessing_parts_run_as_a_slurm_array_then_merge_into_the_single_"
     "run_bytes submits the same to a one-node SLURM"),
    (r"^gcloud\b", SKIP, "needs a TPU pod slice (gcloud, TPU VMs)"),
    (r"\bsbatch\b|local_cluster\.sh|^(squeue|scancel|scontrol)\b|^export SLURM_CONF=", SKIP,
     "drives a SLURM cluster (root, slurm-wlm): tests/test_slurm.py does these steps against local_cluster.sh's "
     "controller"),
    (r"^bash runs/\S+/sweep_tpu\.sh\b", SKIP, "needs gcloud and a TPU pod slice; tests/test_sweep.py runs the "
     "script (and its setup) with stand-ins for gcloud, gcsfuse, make and the workers' python"),
    (r"^bash runs/\S+/skypilot/launch\.sh\b", SKIP, "needs SkyPilot and a cloud account; tests/test_sweep.py runs "
     "launch.sh with a stand-in sky and each task's run script as a node would"),
    (r"^\.venv-cuda/", SKIP, "needs the CUDA plugin venv .venv-cuda (`make venv-cuda`, ~4 GB from PyPI)"),
    (r"^\.venv-tpu/", SKIP, "needs the TPU compiler venv .venv-tpu (`make venv-tpu`, libtpu from PyPI)"),
    (r"--coordinator_address", SKIP,
     "needs 2 hosts; tests/test_distributed.py runs the same flags as 2 processes over loopback"),
    (r"scripts/gpu_bench\.sh", SKIP, "needs an NVIDIA GPU"),
    (r"print\(jax\.devices\(\)\)", SKIP, "shows the GPUs a CUDA venv sees: needs an NVIDIA GPU"),
    (r"scripts/scaling_study\.sh", SKIP, "12 training runs (~15 minutes on 2 cores), then the fits: "
     "tests/test_scaling.py fits synthetic losses of a known law and plans an isoflop sweep"),
    (r"scripts/cpu_figures\.sh", SKIP,
     "re-measures every CPU figure of the README (hours); its commands are the benchmark commands here"),
    (r"benchmark\.py (train|energy) --preset gpu-", SKIP, "needs an NVIDIA GPU (a gpu-* preset)"),
    (r"benchmark\.py generate .*pythia\.py:1\.4b", SKIP,
     "decodes pythia-1.4b against HF torch: a GPU benchmark (~6 GB of weights, minutes per batch on CPU); "
     "tests/test_benchmark.py runs `generate` on configs/tiny.py"),
    (r"benchmark\.py (train|energy|eval)\b", SKIP, _SLOW_BENCH),
    (r"benchmark\.py checkpoint\b", SKIP, "saves pythia-160m's 2.3 GB train state ten times (minutes on 2 cores); "
     "tests/test_benchmark.py runs the subcommand on configs/tiny.py"),
    (r"benchmark\.py data .*--input BIG\.jsonl\.zst", SKIP, "BIG.jsonl.zst stands for your own input"),
    (r"benchmark\.py data\b", SKIP,
     "builds a gpt_neox index of up to 150 M samples (~4 GB of memory, ~1 minute); "
     "tests/test_data_pipeline.py::test_bench_reports_throughput runs it small"),
    (r"inspect_sharding\.py .*configs/neox_20b\.py", SKIP, _BIG_COMPILE),
    (r"/data/pythia/", SKIP,
     "needs Pythia's pre-shuffled Pile at /data/pythia (not bundled); tests/test_data_order.py reads the "
     "sequential order and the batch viewer on small files"),
    (r"scripts/train\.py .*configs/pythia\.py", SKIP,
     "trains a Pythia model: GPUs and tokenized Pile data (hours to days on 2 CPU cores); tests/test_train_step.py "
     "and tests/test_pipeline.py hold the layouts its config uses to the 1-device run"),
    (r"plan_run\.py .*--benchmark train-gpu-", SKIP,
     "reads the JSON of `benchmark.py train --json` run on a GPU; tests/test_energy.py::"
     "test_planner_mfu_from_a_benchmark_file reads a written one"),
    (r"sweep\.py --sweep configs/sweeps/tiny\.py --emit local|sweep\.py --summarize runs/sweeps/tiny\b", SKIP,
     "4 training runs (~40 s idle, 2.5 minutes on 2 busy cores), then their summary: tests/test_sweep.py::"
     "test_local_sweep_then_summary runs the same sweep file and summarizes it"),
    (r"^(make train\b|\.venv/bin/python -c |cp )", RUN, ""),
    (r"^\.venv/bin/python scripts/benchmark\.py profile\b", RUN, ""),
    (r"^(XLA_FLAGS=\S+ )?\.venv/bin/python scripts/(train|convert_hf|export_params|inspect_sharding|"
     r"train_tokenizer|preprocess_data|dedup_report|batch_viewer|sweep|evaluate|generate|plan_run|"
     r"verify_data|merge_data)\.py\b", RUN, ""),
]

# The one command family too slow to run as written, run cheaper. A run of configs/tiny.py (`make train`, or
# scripts/train.py with no --config or --config configs/tiny.py) that sets no train.steps trains 4 steps, or up to
# the end of its train.profile_steps window: its 800 steps take ~5 minutes on 2 cores (~10 pipelined), and 4 write
# the same workdir (checkpoints, metrics.jsonl, config.json, loss.png) for the commands after it.
# tests/test_trainer.py checks the loop, tests/test_pipeline.py the pipelined steps.
_TINY_RUN = re.compile(r"^(make train\b|(XLA_FLAGS=\S+ )?\.venv/bin/python scripts/train\.py\b)")


def _cheaper(text: str) -> str:
    config = re.search(r"--config[ =](\S+)", text)
    if not _TINY_RUN.match(text) or "--config.train.steps=" in text or (config and config[1] != "configs/tiny.py"):
        return text
    window = re.search(r"--config\.train\.profile_steps=\d+,(\d+)", text)
    steps = f"--config.train.steps={max(4, int(window[1]) if window else 0)}"
    make = re.fullmatch(r'make train(?: ARGS="([^"]*)")?', text)
    if make:
        return f'make train ARGS="{make[1] + " " if make[1] else ""}{steps}"'
    return text if text.startswith("make") else f"{text} {steps}"


@dataclasses.dataclass(frozen=True)
class Case:
    command: Command
    action: str  # RUN, SKIP, XFAIL or "" (no rule)
    reason: str
    run: str     # what bash runs (RUN and XFAIL), before /tmp is moved


def _classify(cmd: Command, earlier: dict[str, "Case"]) -> tuple[str, str]:
    if cmd.text in earlier:
        first = earlier[cmd.text]
        where = f"the same command as {first.command.file}:{first.command.line}"
        return SKIP, (f"{where}, which runs it" if first.action in (RUN, XFAIL) else f"{where}: {first.reason}")
    for pattern, action, reason in RULES:
        if re.search(pattern, cmd.text):
            return action, reason
    return "", ""


def _cases() -> list[Case]:
    cases, earlier = [], {}
    for doc in DOCS:
        for cmd in commands((ROOT / doc).read_text(), doc):
            action, reason = _classify(cmd, earlier)
            cases.append(Case(cmd, action, reason, _cheaper(cmd.text) if action in (RUN, XFAIL) else cmd.text))
            earlier.setdefault(cmd.text, cases[-1])
    return cases


def _case_id(case: Case) -> str:
    c = case.command
    words = re.sub(r"^(\S+=\S+ )*(\.venv\S*/bin/python )?", "", c.text).split()[:2]
    words = [w.strip("'\"").removeprefix("scripts/").removesuffix(".py") for w in words]
    where = c.tag or (c.section.split()[0].lower() if c.section else "top")
    return re.sub(r"[^\w.:=,+-]+", "_", f"{c.file}:{c.line}-{where}-{'_'.join(words)}")


CASES = _cases()


def _marks(case: Case) -> list:
    """Running cases are slow (the fast tier leaves them out); skipped and unclassified ones cost nothing."""
    return {RUN: [pytest.mark.slow], XFAIL: [pytest.mark.slow, pytest.mark.xfail(strict=True, reason=case.reason)]
            }.get(case.action, [])


def _params():
    return [pytest.param(i, id=_case_id(case), marks=_marks(case)) for i, case in enumerate(CASES)]


def _clone(dest: pathlib.Path) -> None:
    """A fresh clone of this checkout: HEAD, then the working tree's tracked and untracked (not ignored) files."""
    git = functools.partial(subprocess.run, check=True, capture_output=True, text=True)
    head = git(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip()
    git(["git", "clone", "-q", "--no-checkout", str(ROOT), str(dest)])
    git(["git", "-C", str(dest), "checkout", "-q", "--detach", head])
    listed = git(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        src, dst = ROOT / name, dest / name
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            shutil.copy2(src, dst, follow_symlinks=False)
        elif not src.exists() and (dst.is_symlink() or dst.is_file()):
            dst.unlink()  # deleted in the working tree


class Walk:
    """The clone and the commands run in it so far; `through(i)` runs every RUN / XFAIL command up to case i."""

    def __init__(self, base: pathlib.Path):
        self.clone, self.tmp, self.logs = base / "neox_jax", base / "tmp", base / "logs"
        self.tmp.mkdir()
        self.logs.mkdir()
        _clone(self.clone)
        self.env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
        self.env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        XLA_FLAGS=COMPILE_FAST)
        self._link_venv()
        found = self._bash(".venv/bin/python -c \"import importlib.util as u; print(u.find_spec('neox_jax').origin)\"",
                           self.logs / "venv.log", 60)
        origin = (self.logs / "venv.log").read_text().strip()
        assert found == 0 and pathlib.Path(origin).is_relative_to(self.clone), \
            f"the clone's .venv/bin/python imports neox_jax from {origin}, not from the clone {self.clone}"
        self.results: dict[int, tuple[str, int, pathlib.Path]] = {}

    def _link_venv(self) -> None:
        """The clone's .venv: the venv running pytest, entry by entry, with the Makefile's stamps made fresh, so
        `make train` finds it set up (the stamps are newer than the clone's setup.cfg) and installs nothing."""
        venv = pathlib.Path(sys.prefix)
        if venv == pathlib.Path(sys.base_prefix):
            pytest.fail(f"tests/test_readme.py runs the README's commands with the venv running pytest; "
                        f"{sys.executable} is in none: run the suite with `make test`")
        mirror = self.clone / ".venv"
        mirror.mkdir()
        for entry in venv.iterdir():
            if entry.name.startswith(".installed"):
                (mirror / entry.name).touch()
            else:
                (mirror / entry.name).symlink_to(entry)
        make = functools.partial(subprocess.run, cwd=self.clone, env=self.env, capture_output=True, text=True)
        if make(["make", "-q", "setup"]).returncode != 0:  # a venv set up under another Makefile's stamp name
            stamps = re.findall(r"^touch (\.venv/\S+)$", make(["make", "-n", "setup"]).stdout, re.M)
            for stamp in stamps:
                (self.clone / stamp).touch()
        assert make(["make", "-q", "setup"]).returncode == 0, \
            f"`make setup` in the clone would install packages into {venv}: {make(['make', '-n', 'setup']).stdout}"

    def _bash(self, script: str, log: pathlib.Path, timeout: int) -> int:
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.clone, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the command's whole process group: make, python, workers
                proc.wait()
                out.write(f"\n[killed after {timeout} s]\n")
                return -signal.SIGKILL

    def through(self, index: int) -> tuple[str, int, pathlib.Path]:
        for i, case in enumerate(CASES[:index + 1]):
            if i not in self.results and case.action in (RUN, XFAIL):
                script = re.sub(r"(?<![\w.~-])/tmp/", f"{self.tmp}/", case.run)
                log = self.logs / f"{i:03d}.log"
                self.results[i] = script, self._bash(script, log, TIMEOUT_S), log
        return self.results[index]


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    w = Walk(tmp_path_factory.mktemp("readme_walk"))
    yield w
    for folder in (w.clone, w.tmp):  # ~0.5 GB (pythia-70m weights, checkpoints); the logs stay
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("index", _params())
def test_readme_command(index, request):
    case = CASES[index]
    where = f"{case.command.file}:{case.command.line}"
    if not case.action:
        pytest.fail(f"{where}: no rule in tests/test_readme.py RULES classifies `{case.command.text}`: add one "
                    f"(RUN it, or SKIP / XFAIL it with the reason it cannot run here and what covers it)")
    if case.action == SKIP:
        pytest.skip(f"{where} `{' '.join(case.command.text.split())}`: {case.reason}")
    script, status, log = request.getfixturevalue("walk").through(index)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert status == 0, (f"{where}: exit status {status} of\n  {script}\n(ran in a fresh clone; whole output in {log})"
                         f"\n--- last lines:\n{tail}")


def test_commands_are_parsed_as_bash_reads_them():
    text = """# Title
```bash
make train   # a comment
# a comment line
.venv/bin/python scripts/a.py --x 1 \\
    --y '#not a comment' --z "a # b"  # but this is
echo "two
lines" && echo done
cat a |
  wc -l
```
```
not bash
```
## Later
<!-- section:later -->
```bash
run --tag=x#y
```
"""
    got = [(c.line, c.section, c.tag, c.text) for c in commands(text, "X.md")]
    assert got == [
        (3, "", "", "make train"),
        (5, "", "", ".venv/bin/python scripts/a.py --x 1 --y '#not a comment' --z \"a # b\""),
        (7, "", "", 'echo "two\nlines" && echo done'),
        (9, "", "", "cat a | wc -l"),
        (18, "Later", "later", "run --tag=x#y"),
    ]
