"""QThink (the QThink card) and CODI: teacher hidden states from many CoT rollouts
(reward-weighted over the correct ones, :mod:`latentlib.teacher`) distilled into K latent
steps through a projection head.

- :mod:`.model`: what is injected where (K thoughts through the projection head, then
  text), the evaluation spec and batched inference;
- :mod:`.distill`: the distillation loss and the training of one row of the comparison
  (discrete SFT, latent without teacher, uniform or reward-weighted teachers, final-step
  or per-step);
- :mod:`.io`: checkpoints in the published release's layout (model or adapter directory
  plus ``projection_head.pt``, read without unpickling code).
"""

from latentlib.methods.qthink.distill import (MODES, DistillConfig, distill_distance, distill_examples, distill_loss,
                                              make_distill_batch, train_qthink)
from latentlib.methods.qthink.io import (HEAD_FILE, HeadShapeError, UnsafeCheckpointError, load_head, load_qthink,
                                         save_head, save_qthink)
from latentlib.methods.qthink.model import make_projection, qthink_policy, qthink_segments, qthink_spec, think

__all__ = ["MODES", "DistillConfig", "distill_distance", "distill_examples", "distill_loss", "make_distill_batch",
           "train_qthink", "HEAD_FILE", "HeadShapeError", "UnsafeCheckpointError", "load_head", "load_qthink",
           "save_head", "save_qthink", "make_projection", "qthink_policy", "qthink_segments", "qthink_spec", "think"]
