"""Training that knows no method: the loop (:mod:`.loop`), the curriculum schedule
(:mod:`.curriculum`), the language-modelling losses (:mod:`.losses`), LoRA adapters
(:mod:`.lora`) and the exact measure of what a step keeps for its backward (:mod:`.memory`)."""
