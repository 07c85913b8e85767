"""The pipeline's stages: what a notebook cell (or a command) runs.

Each stage is a function of a run name and a typed configuration that returns what it
made, writing its artifacts under ``runs/<run>/<stage>/<name>``; each configuration has a
``from_params`` that reads a notebook's flat parameters. One rule decides whether a
finished artifact is reused (:mod:`.reuse`): its key is the stage's whole configuration
plus the identities of its inputs.

| stage | function | notebook |
|---|---|---|
| base | :func:`.base.base_models` | 00_teacher_extraction |
| teacher | :func:`.teacher.teacher` | 00_teacher_extraction |
| qthink | :func:`.qthink.qthink_comparison` | 01_sft |
| switch phase 1 | :func:`.switch.switch_phase1` | 01_sft |
| coconut | :func:`.coconut.coconut` (and its parts) | 02_curriculum |
| switch phase 2 | :func:`.switch.switch_phase2` | 02_curriculum |
| switch phase 3 | :func:`.switch.switch_phase3` | 03_grpo |
| evaluate (light) | :func:`.evaluation.evaluation` (:func:`.light.light_methods_table`) | 04_evaluation |
| probes | :mod:`.probes` | 05_probes |
| latent search | :func:`.probes.latent_search_models`, :func:`.probes.forced_switch`, :func:`.probes.latent_nodes` | 06_latent_search |
"""

from latentlib.stages.base import BaseModel, BaseModelsConfig, base_model, base_models, load_base
from latentlib.stages.coconut import (CoconutModel, CoconutResults, CoconutRunConfig, CoconutStageConfig,
                                      bracketed_base, coconut, coconut_formats, coconut_model, coconut_table1,
                                      coconut_thoughts, coconut_variants, table1_across_tasks, vcr_memory)
from latentlib.stages.evaluation import Evaluation, EvaluationConfig, evaluation
from latentlib.stages.light import LightConfig, LightResult, light_methods_table, training_free_table
from latentlib.stages.probes import (LatentSearchModels, ProbeModels, ablations, coconut_lens, forced_switch,
                                     latent_nodes, latent_search_models, probe_models)
from latentlib.stages.qthink import QThinkComparison, QThinkConfig, qthink_comparison, qthink_row
from latentlib.stages.reuse import Built, build_or_reuse
from latentlib.stages.switch import (Phase1Config, Phase2Config, Phase3Config, PhaseResult, load_spans,
                                     switch_phase1, switch_phase2, switch_phase3)
from latentlib.stages.teacher import TeacherStageConfig, teacher, teacher_throughput

__all__ = ["BaseModel", "BaseModelsConfig", "base_model", "base_models", "load_base", "CoconutModel",
           "CoconutResults", "CoconutRunConfig", "CoconutStageConfig", "bracketed_base", "coconut", "coconut_formats",
           "coconut_model", "coconut_table1", "coconut_thoughts", "coconut_variants", "table1_across_tasks",
           "vcr_memory", "Evaluation",
           "EvaluationConfig", "evaluation", "LightConfig", "LightResult", "light_methods_table",
           "training_free_table", "ProbeModels", "ablations", "coconut_lens", "probe_models", "LatentSearchModels",
           "latent_search_models", "forced_switch", "latent_nodes", "QThinkComparison", "QThinkConfig",
           "qthink_comparison", "qthink_row", "Built", "build_or_reuse", "Phase1Config", "Phase2Config",
           "Phase3Config", "PhaseResult", "load_spans", "switch_phase1", "switch_phase2", "switch_phase3",
           "TeacherStageConfig", "teacher", "teacher_throughput"]
