"""Healing (`latentkv finetune`) on a tiny converted Llama: loss, merge, resume, refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models import TINY_TEXT, damaged_copy, short_training_text

from latentkv.errors import LatentKVError
from latentkv.finetune import FinetuneOptions, finetune, load_adapter
from latentkv.finetune import targets as tg
from latentkv.finetune.speed import use_frequency_buffers
from latentkv.modeling import load_model


@pytest.fixture(scope="module")
def healing(tiny_model_dir, tmp_path_factory):
    """A tiny Llama, its MLA conversion at 50% of the KV cache, and a short training text."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    root = tmp_path_factory.mktemp("heal")
    source = tiny_model_dir("llama")
    convert(ConvertOptions(
        source=str(source), output=str(root / "mla"), method_options=dict(kv_budget=0.5),
        calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(root / "cache")),
    ))
    damaged = damaged_copy(root / "mla", root / "damaged", "kv_b_proj")  # noise on the latent up-projection
    return {"source": source, "model": root / "mla", "damaged": damaged, "data": short_training_text(root),
            "root": root}


def _opts(h, out, **kw) -> FinetuneOptions:
    base = dict(model=str(h["model"]), output=str(h["root"] / out), data=str(h["data"]), teacher=str(h["source"]),
                tokens=8 * 64 * 6, seq_len=64, batch_size=8, micro_batch_size=4, lr=3e-3, warmup=0.0,
                eval_windows=0, log_every=1, checkpoint_every=0)
    base.update(kw)
    return FinetuneOptions(**base)


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_distillation_loss_falls(healing):
    """Guards against a training step that does not train: wrong parameters frozen, the teacher's
    distribution not reaching the loss, the optimizer or schedule not stepping. Also checks the
    log file beside the output and the before/after table in the card."""
    seen = []
    r = finetune(_opts(healing, "falls", model=str(healing["damaged"]), mode="attention", lr=1e-3,
                       tokens=8 * 64 * 8, eval_windows=2, eval_window=64,
                       eval_text=str(healing["data"])),
                 progress=lambda event, info: seen.append(info) if event == "step" else None)
    kl = [s["kl"] for s in seen]
    assert len(kl) == 8 and kl[0] > 0
    assert sum(kl[-2:]) / 2 < 0.7 * kl[0], kl
    assert r.after < r.before
    assert r.output is not None and (r.output / "config.json").is_file()
    assert "after healing" in (r.output / "README.md").read_text()
    assert (healing["root"] / "falls.log").is_file()
    assert not (healing["root"] / "falls.checkpoints").exists()


def test_hidden_state_term(healing):
    """Guards --hidden-weight: the term is 0 for the teacher's own states and the relative error
    otherwise, it trains (the damaged copy's hidden-state error and KL both fall), and it refuses
    to run without a teacher."""
    from latentkv.finetune.loss import hidden_state_loss

    t = (torch.randn(2, 5, 8), 3 * torch.randn(2, 5, 8))
    assert hidden_state_loss(t, t) == 0
    s = (t[0] + 0.1 * t[0], t[1])  # layer 1 off by 10%: 0.01 relative squared error, layer 2 exact
    assert torch.isclose(hidden_state_loss(s, t), torch.tensor(0.005))

    seen = []
    finetune(_opts(healing, "hidden", model=str(healing["damaged"]), mode="attention", lr=1e-3, hidden_weight=1.0,
                   tokens=8 * 64 * 8), progress=lambda event, info: seen.append(info) if event == "step" else None)
    hidden, kl = [x["hidden"] for x in seen], [x["kl"] for x in seen]
    assert hidden[0] > 0 and sum(hidden[-2:]) / 2 < 0.7 * hidden[0], hidden
    assert sum(kl[-2:]) / 2 < 0.7 * kl[0], kl
    with pytest.raises(LatentKVError, match="--teacher"):
        _opts(healing, "hidden-no-teacher", teacher=None, hidden_weight=1.0)


def test_mlp_lr_scale_groups(healing):
    """Guards --mlp-lr-scale: the MLP's parameters (and only they) get lr x scale, the schedule
    scales both groups alike, and a scale outside (0, 1] is refused."""
    from latentkv.finetune.trainer import param_groups

    model = load_model(healing["model"])
    tg.freeze_all_but(model, tg.FORMAT_TARGETS["latentkv"], "attention+mlp")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(trainable, _opts(healing, "groups", lr=3e-4, mlp_lr_scale=0.25, target="attention+mlp"))
    mlp_ids = {id(p) for n, p in trainable.items() if ".mlp." in n}
    assert [g["lr"] for g in groups] == [3e-4, 3e-4 * 0.25]
    assert {id(p) for p in groups[1]["params"]} == mlp_ids and mlp_ids
    assert not mlp_ids & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for bad in (0.0, 1.5):
        with pytest.raises(LatentKVError, match="--mlp-lr-scale"):
            _opts(healing, "bad-scale", mlp_lr_scale=bad)


def test_lora_merge_equals_adapter(healing):
    """Guards against a merged model that differs from the adapter it came from (a LoRA delta on
    kv_b_proj that the latent attention never applies, wrong scaling, names or dtypes in the merged
    checkpoint) and against the adapter output not loading back."""
    adapter = finetune(_opts(healing, "adapter", lr=1e-2)).output
    merged = finetune(_opts(healing, "merged", lr=1e-2, merge=True)).output
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = load_model(healing["model"])(ids).logits
        unmerged = load_adapter(healing["model"], adapter)(input_ids=ids).logits
        folded = load_model(merged)(ids).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changed the model
    rel = (folded - unmerged).abs().max() / unmerged.abs().max()
    assert rel < 1e-5, f"merged vs adapter: max rel {rel:.3g}"
    kv_b = {k: v for k, v in _weights(adapter).items() if "kv_b_proj.lora_B" in k}
    assert kv_b and all(v.abs().max() > 0 for v in kv_b.values())  # kv_b_proj's adapter trained
    assert set(_weights(merged)) == set(_weights(healing["model"]))


def test_resume_matches_uninterrupted_run(healing):
    """Guards against a resume that restarts, repeats or skips data, loses the optimizer or
    schedule state, or the random state of dropout: an interrupted and resumed run must end where
    an uninterrupted one does."""
    kw = dict(lr=1e-2, merge=True, lora_dropout=0.1, checkpoint_every=2, tokens=8 * 64 * 6)
    full = finetune(_opts(healing, "straight", **kw))
    first = finetune(_opts(healing, "resumed", stop_after_steps=3, **kw))
    assert first.output is None and first.steps == 3
    assert sorted(p.name for p in (healing["root"] / "resumed.checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    second = finetune(_opts(healing, "resumed", **kw))  # the same command again
    assert second.resumed_from == 3 and second.steps == 6
    a, b = _weights(full.output), _weights(second.output)
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, f"resumed run differs from the uninterrupted one by {worst:.3g}"
    finetune(_opts(healing, "changed", stop_after_steps=1, **kw))
    with pytest.raises(LatentKVError, match="other settings"):  # a changed setting does not resume silently
        finetune(_opts(healing, "changed", **{**kw, "lr": 5e-3}))


def test_refuses_other_tokenizer_and_eval_text(healing, tmp_path):
    """Guards against distilling across different vocabularies (token ids that mean different
    things) and against training on the evaluation text: both refused with a clear error, before
    any work, leaving no output."""
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(healing["source"], other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<only-in-the-teacher>"])
    tok.save_pretrained(str(other))
    with pytest.raises(LatentKVError, match="another tokenizer"):
        finetune(_opts(healing, "refused", teacher=str(other)))
    with pytest.raises(LatentKVError, match="WikiText"):
        finetune(_opts(healing, "refused", data=str(tmp_path / "wikitext-2-raw" / "wiki.test.raw")))
    assert not (healing["root"] / "refused").exists()


def test_targets_follow_the_source_module_names():
    """Guards LoRA / full-weight targets on a converted GPT-NeoX: its layers hold the attention as
    `attention` (named in the config's source_modules) and the MLP as dense_h_to_4h / dense_4h_to_h,
    so a pattern fixed to `self_attn` would find nothing there and the run would be refused."""
    from transformers import GPTNeoXConfig

    from latentkv.arch import get_arch
    from latentkv.modeling.modeling_latentkv import LatentKVConfig, LatentKVForCausalLM

    source = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, rotary_pct=0.25)
    spec = dict(kv_lora_rank=8, rope_dim=4, rope_inv_freq=[1.0, 0.1], qk_nope_head_dim=16, latent_heads=1)
    cfg = LatentKVConfig(source_config=source.to_dict(), attention_layers=[spec], softmax_scale=0.25, v_head_dim=16,
                         source_modules=get_arch(source).module_names())
    model = LatentKVForCausalLM(cfg)
    row = tg.targets_for(cfg)
    names = tg.matching_modules(model, tg.target_pattern(row, "attention+mlp", tg.attention_name(model)))
    assert {n.split(".", 3)[3] for n in names} == {
        "attention.q_proj", "attention.kv_a_proj", "attention.kv_b_proj", "attention.o_proj",
        "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}
    assert all(n.startswith("gpt_neox.layers.0.") for n in names)


def test_target_table_and_latent_routing():
    """Guards against LoRA landing on the wrong modules per format (DeepSeek names, MLP widening),
    and against a Qwen3 (qk_norm) layer's k/v projections and per-head query map left frozen,
    and against the two runtime adaptations of LatentAttention changing its numbers: kv_b_proj
    called as a module (so LoRA applies; MLA and GLA) and RoPE frequencies read from a buffer (so
    torch.compile does not recompile per layer). Fails if modeling_latentkv.py changes under them."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    ds = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, n_routed_experts=2, num_experts_per_tok=1))
    row = tg.targets_for(ds.config)
    attn = {n.rsplit(".", 1)[-1] for n in tg.matching_modules(ds, tg.target_pattern(row, "attention"))}
    assert attn == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    wide = {n.rsplit(".", 1)[-1] for n in tg.matching_modules(ds, tg.target_pattern(row, "attention+mlp"))}
    assert wide == attn | {"gate_proj", "up_proj", "down_proj"}

    from latentkv.modeling.modeling_latentkv import LatentAttention, LatentKVConfig

    for latent_heads, qk_norm in ((1, False), (2, False), (1, True)):
        spec = dict(kv_lora_rank=8, rope_dim=4, rope_inv_freq=[1.0, 0.1], qk_nope_head_dim=6, latent_heads=latent_heads)
        if qk_norm:  # a Qwen3 layer: the source's q/k/v projections and norms kept, a per-head query map
            spec.update(qk_norm=True, qk_norm_eps=1e-6)
        cfg = LatentKVConfig(source_config=dict(model_type="llama", hidden_size=16, num_attention_heads=4,
                                                num_key_value_heads=2, num_hidden_layers=1, vocab_size=8),
                             attention_layers=[spec], softmax_scale=0.3, v_head_dim=5)
        layer = LatentAttention(cfg, 0)
        if qk_norm:  # --mode attention trains its linears and the per-head query map, not the norms
            torch.nn.init.normal_(layer.q_head_proj.weight)
            model = torch.nn.Module()
            model.model = torch.nn.Module()
            model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            model.model.layers[0].self_attn = layer
            trained = tg.freeze_all_but(model, tg.targets_for(cfg), "attention")
            assert {n.rsplit(".", 1)[-1] for n in trained} == {"q_proj", "k_proj", "v_proj", "kv_a_proj", "kv_b_proj", "o_proj"}
            assert layer.q_head_proj.weight.requires_grad and not layer.k_norm.weight.requires_grad
            layer.requires_grad_(False)
        c, x = torch.randn(2, 3, 8), torch.randn(2, 5, 16)
        pos = torch.arange(3, 8)[None].expand(2, 5)
        expected, out = layer.expand_latent(c), layer(x, position_ids=pos)[0]
        tg.route_projections_through_modules(layer)
        use_frequency_buffers(layer)
        for got, want in zip(layer.expand_latent(c), expected):
            assert torch.allclose(got, want, atol=1e-6), latent_heads
        assert torch.allclose(layer(x, position_ids=pos)[0], out, atol=1e-6)
    with pytest.raises(LatentKVError, match="formats"):
        tg.targets_for(type("C", (), {"model_type": "llama"})())


def test_teacher_samples_are_seeded_resumable_training_text(healing, tmp_path, monkeypatch):
    """Guards `latentkv sample`: rows are the teacher's own continuations (each sampled token has
    probability > 0 under it), the same seed gives the same file, a run stopped after one round
    continues to the same file, and the file trains through --data like any other text."""
    import json

    from latentkv.finetune import teacher_text as tt

    def opts(out, **kw):
        return tt.SampleOptions(teacher=str(healing["source"]), output=str(tmp_path / out), tokens=3 * 4 * 24,
                                seq_len=24, batch_size=4, **kw)

    first = tt.sample_teacher_text(opts("a.jsonl"))
    assert first.tokens == 3 * 4 * 24 and first.documents >= 12
    text = first.output.read_text(encoding="utf-8")
    assert text == tt.sample_teacher_text(opts("b.jsonl")).output.read_text(encoding="utf-8")
    assert text != tt.sample_teacher_text(opts("c.jsonl", seed=1)).output.read_text(encoding="utf-8")
    assert all(json.loads(line)["text"] for line in text.splitlines())
    with pytest.raises(LatentKVError, match="--overwrite"):
        tt.sample_teacher_text(opts("a.jsonl"))

    real_round, calls = tt.sample_round, []

    def stop_after_one(*args, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_round(*args, **kw)

    monkeypatch.setattr(tt, "sample_round", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        tt.sample_teacher_text(opts("d.jsonl"))
    monkeypatch.setattr(tt, "sample_round", real_round)
    seen = []
    resumed = tt.sample_teacher_text(opts("d.jsonl"), progress=lambda done, total: seen.append(done))
    assert resumed.output.read_text(encoding="utf-8") == text and seen == [1, 2, 3]

    # The cached sampling loop continues the sequence the teacher sees: near temperature 0 it is
    # the greedy continuation computed by full forward passes without a cache.
    model = load_model(healing["source"]).eval()
    rows = tt.sample_round(model, 0, 2, 12, 1e-4, torch.Generator().manual_seed(5), torch.device("cpu"))
    ids = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(rows, ids[:, 1:])
    assert tt.split_documents([5, 0, 0, 7, 8, 0, 9], 0) == [[5], [7, 8], [9]]

    r = finetune(_opts(healing, "on-samples", data=str(first.output), mode="attention", tokens=8 * 24 * 2, seq_len=24))
    assert r.steps == 2 and r.output is not None


def test_sample_next_draws_from_the_tempered_softmax():
    """The exponential race that replaced torch.multinomial draws each token with probability
    softmax(logits / T): 200k draws from a 4-way law land within 4 standard errors of it at T = 1
    and T = 0.5, and a zero-probability token is never drawn."""
    from latentkv.finetune.teacher_text import sample_next

    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for temperature in (1.0, 0.5):
        law = torch.softmax(logits / temperature, -1)
        drawn = sample_next(logits.expand(n, 4), temperature, gen)[:, 0]
        freq = torch.bincount(drawn, minlength=4).double() / n
        stderr = (law * (1 - law) / n).sqrt()
        assert freq[3] == 0
        assert ((freq - law).abs() <= 4 * stderr + 1e-12).all(), (temperature, freq, law)


@pytest.mark.parametrize("arch,to", [("llama", "mla"), ("gpt_neox", "gta")])
def test_attention_transfer_is_exact_at_full_rank(arch, to, tiny_model_dir, tmp_path):
    """Guards the transfer phase's plumbing: the student's attention, called with the arguments the
    teacher's attention received (forward hooks), must give the teacher's output exactly when the
    conversion is exact (full rank), on a pre-norm Llama and on GPT-NeoX's parallel residual
    layers (other module names, fused QKV), and give a nonzero loss once the weights change."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
    from latentkv.finetune.transfer import AttentionTransfer

    source = tiny_model_dir(arch)
    method = dict(kv_budget=1.0) if to == "mla" else {}
    convert(ConvertOptions(source=str(source), output=str(tmp_path / to), method=to, method_options=method,
                           calib=CalibOptions(data=str(TINY_TEXT), samples=4, seq_len=32, cache=str(tmp_path / "c"))))
    student, teacher = load_model(tmp_path / to), load_model(source)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    transfer = AttentionTransfer(student, teacher)
    loss, parts = transfer.loss(ids)
    assert len(transfer.student_attention) == teacher.config.num_hidden_layers
    if to == "mla":
        assert float(loss.detach()) < 1e-10, float(loss.detach())
        with torch.no_grad():
            transfer.student_attention[0].o_proj.weight.mul_(1.1)  # 10% off in one of the layers
        _, parts = transfer.loss(ids)
        assert float(parts["transfer"]) == pytest.approx(0.01 / len(transfer.student_attention), rel=1e-3)
    else:  # GTA-T is not exact; the loss is the relative error of its one-shot fit, and it has a gradient
        assert 0 < float(loss.detach()) < 1
        loss.backward()
        assert transfer.student_attention[0].kv_a_proj.weight.grad.abs().max() > 0
    assert teacher.model if arch == "llama" else teacher.gpt_neox  # the hooks left the teacher as it was
    assert not any(m._forward_hooks for m in transfer.teacher_attention)


def test_attention_transfer_phase(healing):
    """Guards the two-phase run: the transfer loss falls during its steps, the KL phase follows with
    its own warm-up and decay (the schedule is per phase), and the combined run still heals; a
    transfer budget that leaves no KL step, or one without a teacher, is refused."""
    from latentkv.finetune.trainer import StepPlan

    seen = []
    opts = _opts(healing, "transfer", model=str(healing["damaged"]), mode="attention", lr=1e-3, transfer_lr=3e-3,
                 tokens=8 * 64 * 12, transfer_tokens=8 * 64 * 6, warmup=0.34, eval_windows=2, eval_window=64,
                 eval_text=str(healing["data"]))
    plan = StepPlan.make(opts, 1)
    assert (plan.transfer_steps, plan.total_steps) == (6, 12)
    factors = [plan.lr_factor(s, 0.1) for s in range(12)]
    assert factors[0] == pytest.approx(3 * 0.5) and max(factors[:6]) == pytest.approx(3.0)  # 2 warm-up steps of 6
    assert factors[5] == pytest.approx(3 * 0.1) and factors[6] == pytest.approx(0.5) and factors[11] == pytest.approx(0.1)
    r = finetune(opts, progress=lambda event, info: seen.append(info) if event == "step" else None)
    transfer = [s["transfer"] for s in seen if "transfer" in s]
    kl = [s["kl"] for s in seen if "kl" in s]
    assert len(transfer) == 6 and len(kl) == 6
    assert transfer[0] > 0 and transfer[-1] < 0.7 * transfer[0], transfer
    assert r.after < r.before
    for bad, match in ((dict(transfer_tokens=8 * 64 * 12), "--transfer-tokens"),
                       (dict(transfer_tokens=64, teacher=None), "--teacher")):
        with pytest.raises(LatentKVError, match=match):
            _opts(healing, "bad-transfer", tokens=8 * 64 * 12, **bad)


def test_latent_annealing_narrows_the_written_model(healing, tmp_path):
    """Guards --anneal-rank: the faded latent rows are exactly zero once the fade is over, the
    written model has the narrower latent (config and tensors), dropping the zero dimensions changes
    no logit, and the perplexity measured at the end of training is the written model's own; other
    layer kinds and LoRA are refused."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
    from latentkv.eval.perplexity import perplexity
    from latentkv.finetune.anneal import narrow_latent

    wide = tmp_path / "wide"
    convert(ConvertOptions(source=str(healing["source"]), output=str(wide), method_options=dict(kv_budget=0.5, qk_rope_dim=8),
                           calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(tmp_path / "c"))))
    model = load_model(wide)
    assert {spec["kv_lora_rank"] for spec in model.config.attention_layers} == {24}
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_proj.weight[12:24] = 0
            if layer.self_attn.kv_a_proj.bias is not None:
                layer.self_attn.kv_a_proj.bias[12:24] = 0
        zeroed = model(ids).logits
        narrow_latent(model, 12)
        narrowed = model(ids).logits
    assert torch.allclose(zeroed, narrowed, atol=1e-6, rtol=0)

    opts = _opts(healing, "annealed", model=str(wide), mode="attention", lr=1e-3, tokens=8 * 64 * 8, anneal_rank=12,
                 anneal_tokens=8 * 64 * 4, eval_windows=2, eval_window=64, eval_text=str(healing["data"]))
    r = finetune(opts)
    out = load_model(r.output)
    assert {spec["kv_lora_rank"] for spec in out.config.attention_layers} == {12}
    assert out.model.layers[0].self_attn.kv_a_proj.weight.shape[0] == 12 + 8
    assert out.model.layers[0].self_attn.kv_b_proj.weight.shape[1] == 12
    from latentkv.finetune.pipeline import _eval_windows, _tokenizer

    windows = _eval_windows(opts, _tokenizer(healing["model"], False))  # the run's own evaluation windows
    assert perplexity(out, windows) == pytest.approx(r.after, rel=1e-4)
    with pytest.raises(LatentKVError, match="--mode attention"):
        _opts(healing, "bad-anneal", anneal_rank=12)
    with pytest.raises(LatentKVError, match="--anneal-rank"):
        _opts(healing, "bad-anneal", mode="attention", anneal_tokens=64)


def test_plugins_for_builds_the_built_ins(healing):
    """Guards the map from options to the loop's plug-ins (one per optional part, in a fixed order)
    and the FSDP refusals, which are the plug-ins' own."""
    from types import SimpleNamespace

    from latentkv.finetune.plugins import AttentionTransferPhase, HiddenStateMatch, LatentAnnealing, plugins_for
    from latentkv.finetune.trainer import StepPlan

    def built(**kw):
        opts = _opts(healing, "plugins", mode="attention", tokens=8 * 64 * 8, **kw)
        return plugins_for(opts, StepPlan.make(opts, 1))

    assert built() == []
    transfer, anneal, hidden = built(transfer_tokens=8 * 64 * 3, anneal_rank=12, anneal_tokens=8 * 64 * 4,
                                     hidden_weight=0.5)
    assert isinstance(transfer, AttentionTransferPhase) and transfer.phase_steps == 3
    assert isinstance(anneal, LatentAnnealing) and (anneal.rank, anneal.steps) == (12, 4)
    assert isinstance(hidden, HiddenStateMatch) and hidden.weight == 0.5
    assert hidden.forward_kwargs == {"output_hidden_states": True}
    for plugin, flag in ((transfer, "--transfer-tokens"), (anneal, "--anneal-rank")):
        plugin.prepare(SimpleNamespace(fsdp=False))
        with pytest.raises(LatentKVError, match=flag):
            plugin.prepare(SimpleNamespace(fsdp=True))


def test_a_user_plugin_runs_through_the_loop(healing):
    """Guards the plug-in hooks as a user sees them: setup, prepare, a loss term (here zero, so the
    weights are those of the run without it) logged with the others, after_step with the count of
    steps done, and a state kept across a stop and resume; two leading phases are refused."""
    from latentkv.finetune.plugins import TrainerPlugin

    class StepCounter(TrainerPlugin):
        def __init__(self):
            self.steps, self.seen, self.calls = 0, [], []

        def setup(self, trainer):
            self.calls.append("setup")

        def prepare(self, trainer):
            self.calls.append("prepare")

        def extra_loss(self, trainer, ids, out, teacher_out):
            zero = 0.0 * out.logits.float().mean()
            return zero, {"zero": zero.detach()}

        def after_step(self, trainer, step):
            self.steps += 1
            self.seen.append(step)

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    kw = dict(lr=1e-2, merge=True, checkpoint_every=2, tokens=8 * 64 * 4)
    plain = finetune(_opts(healing, "no-plugin", **kw))
    first, logged = StepCounter(), []
    stopped = finetune(_opts(healing, "plugin", stop_after_steps=3, **kw), plugins=[first],
                       progress=lambda event, info: logged.append(info) if event == "step" else None)
    assert stopped.output is None and first.calls == ["setup", "prepare"] and first.seen == [1, 2, 3]
    assert [s["zero"] for s in logged] == [0.0] * 3 and all("kl" in s for s in logged)
    second = StepCounter()
    r = finetune(_opts(healing, "plugin", **kw), plugins=[second])
    assert r.resumed_from == 3 and second.seen == [4] and second.steps == 4  # 3 from the checkpoint
    a, b = _weights(plain.output), _weights(r.output)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    class Phase(TrainerPlugin):
        phase_steps = 1

    with pytest.raises(LatentKVError, match="leading phase"):
        finetune(_opts(healing, "two-phases", **kw), plugins=[Phase(), Phase()])
