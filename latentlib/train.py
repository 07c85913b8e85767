"""One command per pipeline stage: the same stage functions the notebooks call.

    python -m latentlib.train STAGE --params params/<preset>.yaml [-p NAME VALUE ...] [--run NAME]
    python -m latentlib.train base --params params/tiny.yaml -p base_steps 30
    torchrun --nproc_per_node 2 -m latentlib.train coconut --params params/smollm2-135m.yaml
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m latentlib.train switch-phase3 --params ...

A stage's parameters are its notebook's: the defaults of the notebook's ``parameters``
cell, then the parameter file (its top-level keys and its section for that notebook),
then ``-p`` pairs. A name the notebook does not declare is refused before anything runs,
and so is a parameter file written for another preset. Artifacts go where the notebook
writes them (``runs/<run>/...``), under the same reuse rule, so a notebook run after a
command reuses what the command made.

Under a launcher (several processes) every process runs the same stage: training is
shared (DDP or FSDP, :mod:`latentlib.training.parallel`), evaluation and rollouts are
split across the processes, and only the main process writes (:mod:`latentlib.distributed`).
"""

from __future__ import annotations

import os

# Before torch loads: OpenMP's idle threads must not spin (on a shared CPU, or beside the
# other processes of a distributed run, spinning threads slow everything several-fold).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from latentlib import distributed, stages  # noqa: E402
from latentlib.notebook import context, notebook_parameters, notebook_path  # noqa: E402
from latentlib.pipeline import UnknownParameterError, resolve_parameters  # noqa: E402
from latentlib.presets import PRESETS  # noqa: E402

__all__ = ["STAGES", "stage_parameters", "run_stage", "main"]


def _coconut(run, p):
    return stages.coconut(run, stages.CoconutStageConfig.from_params(p), variants=bool(p["run_variants"]))


# stage -> (its notebook, what it runs on a run name and the notebook's parameters)
STAGES: dict[str, tuple[str, Callable]] = {
    "base": ("00_teacher_extraction", lambda run, p: stages.base_models(run, stages.BaseModelsConfig.from_params(p))),
    "teacher": ("00_teacher_extraction", lambda run, p: stages.teacher(run, stages.TeacherStageConfig.from_params(p))),
    "qthink": ("01_sft", lambda run, p: stages.qthink_comparison(run, stages.QThinkConfig.from_params(p))),
    "switch-phase1": ("01_sft", lambda run, p: stages.switch_phase1(run, stages.Phase1Config.from_params(p))),
    "coconut": ("02_curriculum", _coconut),
    "switch-phase2": ("02_curriculum", lambda run, p: stages.switch_phase2(run, stages.Phase2Config.from_params(p))),
    "switch-phase3": ("03_grpo", lambda run, p: stages.switch_phase3(run, stages.Phase3Config.from_params(p))),
    "light": ("04_evaluation", lambda run, p: stages.light_methods_table(run, stages.LightConfig.from_params(p))),
    "evaluate": ("04_evaluation", lambda run, p: stages.evaluation(run, stages.EvaluationConfig.from_params(p))),
}


def stage_parameters(stage: str, params_file: Path, overrides: dict[str, str] | None = None) -> dict:
    """The parameters of ``stage``'s notebook for this run: the notebook's defaults, the
    parameter file's values, the overrides."""
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownParameterError(f"unknown stage {stage!r}{hint}: stages are {', '.join(STAGES)}")
    notebook = STAGES[stage][0]
    path = Path(params_file)
    if not path.is_file():
        raise FileNotFoundError(f"no parameter file {path}: give params/<preset>.yaml (e.g. params/tiny.yaml)")
    spec = yaml.safe_load(path.read_text()) or {}
    preset = str(spec.get("model") or path.stem)
    if path.stem in PRESETS and path.stem != preset:
        raise UnknownParameterError(f"{path} is named for preset {path.stem!r} but holds the parameters of "
                                    f"{preset!r} (its 'model'): use params/{preset}.yaml, or fix the file's model")
    overrides = dict(overrides or {})
    defaults = notebook_parameters(notebook_path(notebook))
    unknown = [n for n in overrides if n not in defaults]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], defaults, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownParameterError(f"unknown parameter {unknown[0]!r} for stage {stage!r} (notebook {notebook}).{hint} "
                                    f"Its parameters: {', '.join(sorted(defaults))}")
    resolved = resolve_parameters(preset, overrides, params_file=path)[notebook]
    return {**defaults, **resolved}


def run_stage(stage: str, params: dict):
    """Runs one stage with a notebook's parameters (threads and seeds fixed as the notebook does)."""
    ctx = context(params)
    return STAGES[stage][1](ctx.run, ctx.params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m latentlib.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", help=f"one of: {', '.join(STAGES)}")
    ap.add_argument("--params", required=True, type=Path, help="the preset's parameter file, params/<preset>.yaml")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override one parameter of the stage's notebook")
    ap.add_argument("--run", default=None, help="run name (default: the parameter file's, else the preset)")
    args = ap.parse_args(argv)
    overrides = dict(args.parameter)
    if args.run:
        overrides["run"] = args.run
    try:
        params = stage_parameters(args.stage, args.params, overrides)
    except (UnknownParameterError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.init()  # a launcher's processes join their group before anything loads
    t0 = time.perf_counter()
    run_stage(args.stage, params)
    if distributed.is_main():
        print(f"[train] {args.stage} (run {params['run'] or params['model']}) done in {time.perf_counter() - t0:.0f} s"
              + (f" on {distributed.world()} processes" if distributed.world() > 1 else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
