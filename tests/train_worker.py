"""A small training run for the crash-and-resume test, run as its own process.

    python tests/train_worker.py RUN_DIR OUT_FILE

Prints ``step N loss L`` after every history row (every optimizer step unless ``LOG_EVERY``
says otherwise), with `` ids I``: the mean over the processes of the mean token id of their
batches' labels, a metric each process measures on its own share; resumes from RUN_DIR's
checkpoint if one is complete; writes the final weights to OUT_FILE (safetensors). Under
torchrun, ``KILL_RANK`` and ``KILL_AT_STEP`` make that rank kill itself (SIGKILL) after that
history row, as a crashed process would.
"""

import os
import signal
import sys

import torch

torch.set_num_threads(1)

from latentlib import distributed  # noqa: E402
from latentlib.artifacts import save_state_dict  # noqa: E402
from latentlib.batching import IGNORE, collate, cot_segments, encode_record  # noqa: E402
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer  # noqa: E402
from latentlib.tasks import ChainConfig, Format, chain_vocabulary, make_chain_splits  # noqa: E402
from latentlib.training.losses import lm_loss  # noqa: E402
from latentlib.training.loop import TrainConfig, train  # noqa: E402

STEPS = 24


def main(run_dir: str, out_file: str) -> None:
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg = ChainConfig(n_train=256, n_valid=0, n_test=0, seed=3)
    splits = make_chain_splits(cfg)
    tok = build_tiny_tokenizer(chain_vocabulary(cfg))
    model = build_tiny_model(len(tok), Preset("t", "scratch", hidden_size=32, num_layers=2, num_heads=2,
                                              num_kv_heads=1, intermediate_size=64), seed=1)
    examples = [cot_segments(encode_record(tok, r, Format(" "))) for r in splits.train]
    tc = TrainConfig(steps=STEPS, batch_size=16, lr=3e-3, warmup_steps=4, checkpoint_every=3,
                     log_every=int(os.environ.get("LOG_EVERY", "1")), seed=5)
    kill_rank, kill_at = int(os.environ.get("KILL_RANK", -1)), int(os.environ.get("KILL_AT_STEP", -1))

    def on_log(row):
        if rank0:
            print(f"step {row['step']} loss {row['loss']:.8f} ids {row['label_id']:.8f}", flush=True)
        if row["step"] == kill_at and distributed.rank() == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def loss_fn(model, batch):
        loss, metrics = lm_loss(model, batch)
        labels = batch["labels"]
        return loss, {**metrics, "label_id": float(labels[labels != IGNORE].float().mean())}

    train(model, examples, lambda b: collate(b, tok.pad_token_id), loss_fn, tc, checkpoint_dir=run_dir,
          progress=False, on_log=on_log)
    state = distributed.whole_state_dict(model)  # every process: a sharded model is gathered
    if rank0:
        save_state_dict(state, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
