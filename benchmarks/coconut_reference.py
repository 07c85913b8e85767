"""The engine against the published Coconut algorithms, re-implemented here from the
paper's description as references (they are slow on purpose; never used by the library).

(a) Evaluation. The published decoding runs one problem at a time and, for every new
    token, re-runs the whole sequence with no KV cache (each thought likewise recomputes
    the prefix). Target: batched engine evaluation of the test split >= 20x faster, with
    identical answers.
(b) Training forward. The published forward makes n+1 sequential passes and, after each
    pass, rebuilds the input embeddings through per-element Python lists to drop in the
    new thought. Target: the engine's loss equal within 1e-5, and no slower.

    python -m benchmarks.coconut_reference [--n-test 500] [--thoughts 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import interleaved, save, set_threads
from latentlib import artifacts
from latentlib.batching import collate, encode_record, prompt_batch
from latentlib.policies import LATENT, ScriptedPolicy
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer
from latentlib.recurrence import generate, latent_forward, position_ids_for
from latentlib.tasks import ChainConfig, Format, chain_vocabulary, make_chain_splits
from latentlib.tokens import add_special_tokens
from latentlib.artifacts import load_model_dir
from latentlib.training.losses import token_loss


def load_tiny(run: str = "tiny"):
    """The run's trained CoT model when it exists (answers are then meaningful), else a
    random model of the same size (the speed and the equality checks do not care)."""
    cfg = ChainConfig()
    splits = make_chain_splits(cfg)
    d = artifacts.artifact_dir(run, "base", "cot_markers")
    if artifacts.is_complete(d):
        model, tok = load_model_dir(d)
        source = str(d)
    else:
        tok = build_tiny_tokenizer(chain_vocabulary(cfg))
        model = build_tiny_model(len(tok), Preset("tiny", "scratch"))
        source = "random tiny model"
    add_special_tokens(model, tok)
    model.eval()
    return model, tok, splits, source


# ---------------------------------------------------------------------------- (a) evaluation


@torch.no_grad()
def reference_decode(model, prompt: list[int], n_thoughts: int, bot: int, eot: int, eos: int, max_new: int):
    """One problem; no KV cache: every thought and every token re-runs the whole sequence."""
    embed = model.get_input_embeddings()
    embeds = embed(torch.tensor([prompt + [bot]]))  # (1, T, D)
    for _ in range(n_thoughts):
        h = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -1:]
        embeds = torch.cat([embeds, h], 1)
    embeds = torch.cat([embeds, embed(torch.tensor([[eot]]))], 1)
    out = []
    for _ in range(max_new):
        nxt = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[nxt]]))], 1)
    return out


def engine_decode(model, prompts, n_thoughts, bot, eot, eos, pad, max_new, batch_size=250):
    outs = []
    policy = ScriptedPolicy([bot] + [LATENT] * n_thoughts + [eot])
    for s in range(0, len(prompts), batch_size):
        ids, mask = prompt_batch(prompts[s:s + batch_size], pad)
        trace = generate(model, ids, mask, policy=policy, max_new_tokens=n_thoughts + 2 + max_new,
                         eos_token_id=eos, pad_token_id=pad)
        for b in range(ids.shape[0]):
            text = trace.text_ids(b)[2:]  # drop the forced markers
            outs.append(text)
    return outs


def bench_eval(model, tok, records, n_thoughts: int, max_new: int = 4) -> dict:
    ids = tok.get_vocab()
    bot, eot, eos, pad = ids["<bot>"], ids["<eot>"], tok.eos_token_id, tok.pad_token_id
    prompts = [list(encode_record(tok, r, Format(" ")).question) for r in records]
    t0 = time.perf_counter()
    ref = [reference_decode(model, p, n_thoughts, bot, eot, eos, max_new) for p in prompts]
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = engine_decode(model, prompts, n_thoughts, bot, eot, eos, pad, max_new)
    t_ours = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(ref, ours))
    row = {"problems": len(records), "thoughts": n_thoughts, "reference_s": t_ref, "engine_s": t_ours,
           "speedup": t_ref / t_ours, "identical_answers": same, "target_speedup": 20}
    print(f"(a) evaluation of {len(records)} problems, {n_thoughts} thoughts: reference {t_ref:.1f} s, "
          f"engine {t_ours:.2f} s -> {row['speedup']:.1f}x (target >= 20x); identical answers {same}/{len(records)}",
          flush=True)
    return row


# ---------------------------------------------------------------------------- (b) training forward


def reference_forward(model, input_ids, attention_mask, labels, latent_id):
    """The published multi-pass forward: n+1 passes, embeddings rebuilt from Python lists."""
    embeds = model.get_input_embeddings()(input_ids)
    B, T = input_ids.shape
    pos = position_ids_for(attention_mask)
    latent_idx = (input_ids == latent_id).nonzero()
    lists = [[int(i[1]) for i in latent_idx if i[0] == b] for b in range(B)]
    n_max = max(len(x) for x in lists)
    rng = (0, int(latent_idx[:, 1].min())) if n_max else (0, T)
    cache, all_logits = None, []
    for p in range(n_max):
        if cache is None:
            out = model(inputs_embeds=embeds[:, rng[0]:rng[1]], attention_mask=attention_mask[:, :rng[1]],
                        position_ids=pos[:, rng[0]:rng[1]], output_hidden_states=True, use_cache=True)
            offset = 0
        else:
            extra = cache.get_seq_length() - rng[0]  # the published code trims the cache to the range start
            if extra > 0:
                cache.crop(-extra)
            out = model(inputs_embeds=embeds[:, rng[0]:rng[1]], attention_mask=attention_mask[:, :rng[1]],
                        position_ids=pos[:, rng[0]:rng[1]], cache=cache, output_hidden_states=True,
                        use_cache=True)
            offset = rng[0]
        all_logits.append(out.logits)
        rng = (rng[1], T if p + 1 >= n_max else rng[1] + 1)
        hidden = out.hidden_states[-1]
        cache = out.cache
        # The published way: a Python list per element, the thought dropped in, restacked.
        rows = [[embeds[b, t, :] for t in range(T)] for b in range(B)]
        for b, slots in enumerate(lists):
            if len(slots) > p:
                t = slots[p]
                rows[b][t] = hidden[b, t - 1 - offset, :]
        embeds = torch.stack([torch.stack(rows[b]) for b in range(B)])
    out = model(inputs_embeds=embeds[:, rng[0]:rng[1]], attention_mask=attention_mask[:, :rng[1]],
                position_ids=pos[:, rng[0]:rng[1]], cache=cache, use_cache=True)
    all_logits.append(out.logits)
    return token_loss(torch.cat(all_logits, 1), labels)


def stage_batch(tok, records, n_removed: int, c: int = 1):
    ids = tok.get_vocab()
    examples = []
    for r in records:
        enc = encode_record(tok, r, Format(" "))
        rest = tuple(t for s in enc.steps[n_removed:] for t in s)
        examples.append([("prompt", enc.question), ("prompt", (ids["<bot>"],)),
                         ("latent", (ids["<latent>"],) * (n_removed * c)), ("prompt", (ids["<eot>"],)),
                         ("target", rest), ("target", enc.answer)])
    return collate(examples, tok.pad_token_id, align="first_latent")


def bench_train(model, tok, records, n_removed: int, repeats: int) -> dict:
    model.train()
    batch = stage_batch(tok, records, n_removed)
    lat = tok.get_vocab()["<latent>"]

    def ours():
        model.zero_grad(set_to_none=True)
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"])
        loss = token_loss(out.logits, batch["labels"])
        loss.backward()
        return loss.item()

    def ref():
        model.zero_grad(set_to_none=True)
        loss = reference_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"], lat)
        loss.backward()
        return loss.item()

    diff = abs(ours() - ref())
    t = interleaved({"reference": ref, "engine": ours}, repeats=repeats)
    model.eval()
    row = {"batch": len(records), "thoughts": n_removed, "loss_abs_diff": diff,
           "reference_s": t["reference"]["min_s"], "engine_s": t["engine"]["min_s"],
           "engine_over_reference": t["engine"]["min_s"] / t["reference"]["min_s"], "times": t}
    print(f"(b) training step, batch {len(records)}, {n_removed} thoughts: |loss diff| {diff:.2e} (target <= 1e-5); "
          f"engine {row['engine_s'] * 1000:.0f} ms vs reference {row['reference_s'] * 1000:.0f} ms "
          f"-> {row['engine_over_reference']:.2f}x the reference's time (target <= 1)", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--thoughts", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    threads = set_threads()
    model, tok, splits, source = load_tiny()
    print(f"threads: {threads}; model: {source}")
    ev = bench_eval(model, tok, splits.test[: args.n_test], args.thoughts)
    tr = [bench_train(model, tok, splits.train[:B], args.thoughts, args.repeats) for B in (32, 128)]
    save("coconut_reference", {"model": source, "evaluation": ev, "training": tr})


if __name__ == "__main__":
    main()
