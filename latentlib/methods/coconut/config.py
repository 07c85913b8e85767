"""Coconut's configuration: the method, the format, what a thought is, and how the
curriculum rewrites a problem at each stage."""

from __future__ import annotations

from dataclasses import dataclass, replace

from latentlib.injection import INJECTION_SPECS, make_injector
from latentlib.training.curriculum import CurriculumConfig

__all__ = ["METHODS", "FORMATS", "CoconutConfig", "without_curriculum"]

METHODS = ("coconut", "pause", "icot", "cot")
FORMATS = ("markers", "plain")


@dataclass(frozen=True)
class CoconutConfig:
    method: str = "coconut"  # "coconut" (thoughts), "pause" (<pause> in the slots), "icot" (no slots), "cot" (written)
    format: str = "markers"  # "markers": question <bot> thoughts <eot> rest; "plain": thoughts in the steps' slots
    c_thought: int = 1  # c: continuous thoughts per removed reasoning step
    max_latent_stage: int = 6  # stages above it remove every step and keep max_latent_stage * c thoughts
    uniform_prob: float = 0.0  # probability of building an example at a random stage in 0..n_steps
    pad_latent_to_max: bool = True  # beyond max_latent_stage: max_latent_stage*c thoughts even for short problems
    removal_smoothing: float = 0.0  # iCoT's lambda: remove s more steps with P(s) ~ exp(-lambda s) (0: none)
    injection: str = "hs[-1]"  # what a thought is (latentlib.injection.INJECTION_SPECS; hs[-1] is the paper's)
    norm_match: bool = False  # rescale thoughts to the embedding RMS
    latent_positions: str = "continue"  # "continue": thoughts take positions; "skip": they share the next text's
    tbptt: int | None = None  # cut backprop between thoughts every tbptt thoughts (None: full)
    vcr_var: float = 0.0  # SEQ-VCR variance weight (0 with vcr_cov 0: no SEQ-VCR)
    vcr_cov: float = 0.0  # SEQ-VCR covariance weight
    vcr_dim: int = 32  # width of the fixed random projection SEQ-VCR looks through
    max_new_tokens: int = 32  # evaluation budget after the scripted thoughts

    def __post_init__(self):
        checks = [
            (self.method in METHODS, f"method={self.method!r}: use one of {METHODS}"),
            (self.format in FORMATS, f"format={self.format!r}: use 'markers' (<bot> thoughts <eot> rest) or 'plain'"),
            (self.c_thought >= 1, f"c_thought={self.c_thought} must be >= 1 (use method='icot' for no thoughts)"),
            (self.max_latent_stage >= 1, f"max_latent_stage={self.max_latent_stage} must be >= 1"),
            (0.0 <= self.uniform_prob <= 1.0, f"uniform_prob={self.uniform_prob} must be a probability in [0, 1]"),
            (self.removal_smoothing >= 0, f"removal_smoothing={self.removal_smoothing} must be >= 0 (0 disables; "
                                          "iCoT uses 4)"),
            (self.latent_positions in ("continue", "skip"),
             f"latent_positions={self.latent_positions!r}: use 'continue' or 'skip'"),
            (self.tbptt is None or self.tbptt >= 1, f"tbptt={self.tbptt} must be >= 1 or None"),
            (self.vcr_var >= 0 and self.vcr_cov >= 0,
             f"vcr_var={self.vcr_var}, vcr_cov={self.vcr_cov}: SEQ-VCR weights must be >= 0 (0 disables)"),
            (self.vcr_dim >= 2, f"vcr_dim={self.vcr_dim} must be >= 2 (a covariance needs two coordinates)"),
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        try:
            make_injector(self.injection, hidden_size=8)
        except ValueError as e:
            raise ValueError(f"injection={self.injection!r}: {e} (e.g. {INJECTION_SPECS[0]!r})") from None

    @property
    def uses_vcr(self) -> bool:
        return self.method == "coconut" and (self.vcr_var > 0 or self.vcr_cov > 0)


def without_curriculum(cfg: CoconutConfig, curriculum: CurriculumConfig,
                       steps: int | None = None) -> tuple[CoconutConfig, CurriculumConfig]:
    """Straight to the last stage, with no mixing of earlier stages (``steps``: its budget,
    default the whole curriculum's): the paper's "w/o curriculum" row."""
    total = curriculum.total_steps if steps is None else steps
    return (replace(cfg, uniform_prob=0.0),
            replace(curriculum, start_stage=curriculum.end_stage, final_stage_steps=total))
