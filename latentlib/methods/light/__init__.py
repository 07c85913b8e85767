"""The light-weight methods: little or no training, each a small change to the prompt,
the activations or the loss.

- :mod:`.pause`: pause tokens (Goyal et al. 2023), untrained (inserted at inference) or trained;
- :mod:`.prefix`: random prefix perturbation (random vectors before the prompt, several draws);
- :mod:`.steering`: steering vectors (ActAdd): a contrast direction added to a layer's output;
- :mod:`.upft`: UPFT, the loss on the first n reasoning tokens only;
- :mod:`.planning`: a planning token written before every step.

The side-by-side comparison on the embedded task (same budget for every trained row) is
the stage :func:`latentlib.stages.light.light_methods_table`.
"""

from latentlib.methods.light.pause import PauseConfig, pause_prompt, pause_segments, pause_spec, train_pause
from latentlib.methods.light.planning import PLAN_TOKEN, PlanningConfig, planning_segments, train_planning
from latentlib.methods.light.prefix import PrefixConfig, PrefixResult, evaluate_random_prefix, prefix_spec
from latentlib.methods.light.steering import (Direction, contrast_directions, first_step_even_rate,
                                              first_step_parity_pairs, steer, steering_sweep)
from latentlib.methods.light.upft import UPFTConfig, sample_prefixes, train_upft, upft_examples

__all__ = ["PauseConfig", "pause_prompt", "pause_segments", "pause_spec", "train_pause", "PLAN_TOKEN",
           "PlanningConfig", "planning_segments", "train_planning", "PrefixConfig", "PrefixResult",
           "evaluate_random_prefix", "prefix_spec", "Direction", "contrast_directions", "first_step_even_rate",
           "first_step_parity_pairs", "steer", "steering_sweep", "UPFTConfig", "sample_prefixes", "train_upft",
           "upft_examples"]
