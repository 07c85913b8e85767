"""Each method whole, in one package: its formats, losses, training, inference and
save/load. ``cot`` holds the written-reasoning baselines the latent methods start from.

- :mod:`.coconut`: continuous thoughts through a curriculum (Hao et al. 2024);
- :mod:`.switch`: switchable latent blocks, its three phases and Switch-GRPO;
- :mod:`.qthink`: multi-rollout teachers distilled into K thoughts through a projection head;
- :mod:`.light`: pause tokens, random prefix, steering vectors, UPFT, planning tokens.
"""
