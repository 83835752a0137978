"""The analysis on real Hugging Face architectures (small configs, random weights)."""

import pytest

import hf_models
from exprune_fx import analyze, check_symmetry


def classes_of(analysis, param):
    for node in analysis.graph_module.graph.nodes:
        if node.meta.get("exprune.target") == param:
            return node.meta["exprune.axes"]
    raise KeyError(param)


@pytest.mark.parametrize("name", sorted(hf_models.ALL))
def test_free_classes_are_symmetries(name):
    model, inputs = hf_models.ALL[name]()
    analysis = analyze(model, inputs, strict=True)
    assert analysis.free_classes, "the analysis found nothing to permute"
    assert check_symmetry(model, inputs, analysis) == []


def test_opt_ffn_width_and_heads_are_free():
    model, inputs = hf_models.opt()
    a = analyze(model, inputs, strict=True)
    cls = {c.id: c for c in a.classes}
    layer = "model.decoder.layers.0"
    (ffn,) = classes_of(a, f"{layer}.fc1.weight")[0]
    assert cls[ffn].free and cls[ffn].size == 64
    (width,) = classes_of(a, f"{layer}.fc1.weight")[1]
    assert cls[width].free and cls[width].size == 32  # learned positions keep the width free
    heads, head_dim = classes_of(a, f"{layer}.self_attn.q_proj.weight")[0]
    assert (cls[heads].size, cls[head_dim].size) == (4, 8)
    assert cls[heads].free and cls[head_dim].free
    assert heads == classes_of(a, f"{layer}.self_attn.out_proj.weight")[1][0]  # heads travel to out_proj
    fc1 = [s for s in a.sites if s.eligible]
    assert len(fc1) == 2 and all(s.decision == "relu" and s.n == 32 for s in fc1)


def test_gpt2_fused_qkv_keeps_heads_free():
    model, inputs = hf_models.gpt2()
    a = analyze(model, inputs, strict=True)
    cls = {c.id: c for c in a.classes}
    pieces, heads, head_dim = classes_of(a, "transformer.h.0.attn.c_attn.weight")[1]  # Conv1D: [in, 3*out]
    assert (cls[pieces].size, cls[heads].size, cls[head_dim].size) == (3, 4, 8)
    assert not cls[pieces].free and cls[heads].free and cls[head_dim].free
    assert check_symmetry(model, inputs, a) == []


def test_opt_lm_head_as_declared_argmax():
    model, inputs = hf_models.opt()
    a = analyze(model, inputs, outputs={"logits": "argmax"})
    head = a.sites[-1]
    assert head.decision == "argmax" and head.eligible and head.n == 32


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_gelu_models_have_no_relu_sites(name):
    model, inputs = hf_models.ALL[name]()
    outputs = ["pooler_output"] if name == "bert" else None  # else the hidden states pin the width
    a = analyze(model, inputs, outputs=outputs)
    assert a.eligible_sites == []
    ffn_up = [s for s in a.sites if s.n == 32 and ("gelu" in s.reason or "mul" in s.reason)]
    assert len(ffn_up) == 2  # one per layer: GELU (GPT-2's is spelled out with mul/tanh) is no decision
    assert check_symmetry(model, inputs, a) == []


def test_hf_resnet_convs_are_eligible():
    model, inputs = hf_models.resnet()
    a = analyze(model, inputs)
    assert len(a.eligible_sites) >= 5
    assert all(s.decision == "relu" for s in a.eligible_sites)


def test_opt_compiles_matches_and_prunes():
    import torch

    import exprune_fx
    from exprune_fx import Config

    model, inputs = hf_models.opt()
    with torch.no_grad():
        ref = model(**inputs).logits
        never = exprune_fx.compile(model, inputs, Config(alpha=0.0, k=8), outputs={"logits": "argmax"})
        out = never(**inputs)
        assert type(out).__name__ == "CausalLMOutputWithPast"
        torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
        assert len(never.rewritten_sites) == 3  # two FFN up-projections and the LM head
        pruning = exprune_fx.compile(model, inputs, Config(alpha=0.3, k=8), outputs={"logits": "argmax"})
        one = {**inputs, "input_ids": inputs["input_ids"][:1]}
        pruning(**one)
    stats = pruning.exprune_stats()
    ffn = [s for s in stats["sites"].values() if s["decision"] == "relu"]
    assert all(s["prune_rate"] > 0 for s in ffn)
    assert stats["rows"] == 1


@pytest.mark.parametrize("name", sorted(hf_models.ALL))
def test_keyword_inputs_export_with_a_dynamic_batch(name):
    from exprune_fx import lift

    model, inputs = hf_models.ALL[name]()
    assert lift(model, inputs, dynamic_batch=True).dynamic_batch


OUTPUTS = {"opt": {"logits": "argmax"}, "gpt2": {"logits": "argmax"}}


@pytest.mark.parametrize("door", ["compile", "torch.compile"])
@pytest.mark.parametrize("name", sorted(hf_models.ALL))
def test_both_doors_agree_with_the_model_when_nothing_is_pruned(name, door):
    import torch

    import exprune_fx
    from exprune_fx import Config

    model, inputs = hf_models.ALL[name]()
    never = Config(alpha=0.0, k=8)
    outputs = OUTPUTS.get(name)
    if door == "compile":
        import contextlib

        nothing = name in ("bert", "vit")  # GELU models: nothing to rewrite, and compile says so
        with pytest.warns(exprune_fx.ExPruneWarning, match="no site was rewritten") if nothing else \
                contextlib.nullcontext():
            fast = exprune_fx.compile(model, inputs, never, outputs=outputs)
    else:
        torch._dynamo.reset()
        graph_outputs = {"0": "argmax"} if outputs else None
        fast = torch.compile(model, backend=exprune_fx.backend(never, inner="eager", outputs=graph_outputs))
    call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(inputs))
    with torch.no_grad():
        ref, out = call(model), call(fast)
    assert type(out) is type(ref)
    for key in ref.keys():
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
