"""The training loop on a tiny base: it learns, resumes exactly, writes adapters `convert` merges like peft, and
refuses bad arguments before any work."""

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from llama_encoder.cli import build_parser
from llama_encoder.cli import main as cli_main
from llama_encoder.training import loop
from llama_encoder.training.arguments import TrainingArguments
from llama_encoder.training.loop import epoch_order, learning_rate, train
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.test_lora_merge import save_lora_adapter
from tests.test_training_ddp import summation_terms
from tests.tiny import save_tiny_base

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-base")
    save_tiny_base(folder)
    return folder


@pytest.fixture()
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


@pytest.fixture()
def sts_file(tmp_path):
    path = tmp_path / "sts.csv"
    rows = [f"{(i * 7) % 6},{TEXTS[i % 8]},{TEXTS[(i * 3 + 1) % 8]}" for i in range(16)]
    path.write_text("score,sentence1,sentence2\n" + "\n".join(rows) + "\n")
    return path


def _args(tiny_base, tmp_path, **overrides) -> TrainingArguments:
    values = dict(objective="mntp", out=str(tmp_path / "adapter"), data=[], base=str(tiny_base), max_steps=4,
                  batch_size=4, show_progress=False, lr=5e-3)
    values.update(overrides)
    return TrainingArguments(**values)


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate(s, peak=1.0, warmup_steps=4, total_steps=12) for s in range(12)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4] == 1.0 and rates[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(50, 1, 0)) == list(range(50))
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)


def test_grouped_order_makes_batches_of_similar_length():
    lengths = [int(x) for x in torch.randint(1, 200, (1003,))]
    order = epoch_order(1003, 1, 0, lengths=lengths, batch_size=10, pool=8)
    assert sorted(order) == list(range(1003))
    batches = [order[i : i + 10] for i in range(0, 1000, 10)]

    def spread(batch):
        return max(lengths[i] for i in batch) - min(lengths[i] for i in batch)

    plain = epoch_order(1003, 1, 0)
    random_spread = sum(spread(plain[i : i + 10]) for i in range(0, 1000, 10))
    assert sum(spread(b) for b in batches) < 0.3 * random_spread
    # the batches come in a shuffled order, not sorted by length
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("objective", ["simcse", "supervised"])
def test_a_few_steps_reduce_the_loss(objective, tiny_base, tmp_path, texts_file, sts_file):
    data = texts_file if objective == "simcse" else sts_file
    summary = train(_args(tiny_base, tmp_path, objective=objective, data=[str(data)], max_steps=30,
                          batch_size=8, lr=1e-2, warmup_ratio=0.0, lora_dropout=0.0, attention_dropout=0.1))
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_mntp_loss_falls_on_repeated_texts(tmp_path, texts_file):
    # A random LM head of std 0.02 over unit-RMS states gives near-uniform logits that LoRA can hardly move.
    base = save_tiny_base(tmp_path / "base", lm_head_scale=50.0)
    summary = train(_args(base, tmp_path, data=[str(texts_file)], max_steps=40, batch_size=8, lr=2e-2,
                          warmup_ratio=0.0, lora_dropout=0.0, mask_probability=0.3))
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_base, tmp_path, texts_file, monkeypatch):
    common = dict(objective="simcse", data=[str(texts_file)], max_steps=6, batch_size=4, attention_dropout=0.2,
                  save_every=2)
    train(_args(tiny_base, tmp_path, out=str(tmp_path / "straight"), **common))

    saved = loop.save_checkpoint

    def save_then_die(folder, step, *args, **kwargs):
        path = saved(folder, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt  # the run stops right after writing the step-4 checkpoint
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_args(tiny_base, tmp_path, out=str(tmp_path / "resumed"), **common))
    assert not (tmp_path / "resumed").exists()
    assert sorted(p.name for p in (tmp_path / "resumed-checkpoints").iterdir()) == ["step-000002", "step-000004"]
    monkeypatch.setattr(loop, "save_checkpoint", saved)
    summary = train(_args(tiny_base, tmp_path, out=str(tmp_path / "resumed"), resume=True, **common))
    assert summary["steps"] == 6 and len(summary["history"]) == 6

    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert set(straight) == set(resumed)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch) -> dict:
    """A SimCSE run killed right after its first checkpoint is saved; returns the run's arguments."""
    common = dict(objective="simcse", data=[str(texts_file)], max_steps=4, batch_size=4, save_every=2)
    saved = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_args(tiny_base, tmp_path, **common))
    monkeypatch.setattr(loop, "save_checkpoint", saved)
    return common


def test_resume_refuses_changed_arguments(tiny_base, tmp_path, texts_file, monkeypatch):
    common = _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch)
    with pytest.raises(ValueError, match=r"arguments differ from the interrupted run \(lr: 0.005 -> 0.001\)"):
        train(_args(tiny_base, tmp_path, resume=True, **{**common, "lr": 1e-3}))
    with pytest.raises(FileExistsError, match="Pass --resume to continue it, or --overwrite"):
        train(_args(tiny_base, tmp_path, **common))


def test_trained_adapters_convert_into_the_model_peft_would_merge(tiny_base, tmp_path, texts_file, sts_file):
    from llama_encoder.conversion_scripts.convert import convert
    from llama_encoder.encoding.encode import Encoder
    from llama_encoder.training.model import load_training_model

    mntp = tmp_path / "mntp"
    train(_args(tiny_base, tmp_path, out=str(mntp), data=[str(texts_file)], lora_dropout=0.0))
    supervised = tmp_path / "supervised"
    train(_args(tiny_base, tmp_path, objective="supervised", out=str(supervised), adapters=[str(mntp)],
                data=[str(sts_file)], pooling="latent_attention", lora_dropout=0.0))
    assert json.loads((supervised / "pooling_config.json").read_text())["pooling_mode"] == "latent_attention"
    head = load_file(supervised / "pooling_head.safetensors")
    assert head and all(name.startswith("latent_attention.") for name in head)

    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[mntp, supervised],
                     format="remote-code")
    assert result.pooling_mode == "latent_attention"

    # independently: the MNTP adapter merged by our loader, the supervised adapter merged by peft, the head loaded
    reference = load_training_model(base=str(tiny_base), adapters=[mntp], pooling="latent_attention")
    encoder = reference.peft_model.unload()  # MNTP merged into its weights, the fresh LoRA layers removed
    model = PeftModel.from_pretrained(encoder, supervised).merge_and_unload().eval()
    model.load_state_dict({k: v for k, v in head.items()}, strict=False)
    texts = ["The cat sat on the mat.", "Where is the cat?", "Plants make sugar."]
    expected = Encoder(model, reference.tokenizer).encode(texts)
    converted = Encoder.from_pretrained(result.out_dir, device="cpu", dtype="float32").encode(texts)
    # two float32 merges of the same adapters (weights equal up to rounding: r + 4 terms per adapter, LoRA r=16),
    # then the forward pass in batches of their own: equal up to summation order
    assert_equal_up_to_summation_order(converted, expected, terms=encoder_terms(model, 32) + 2 * (16 + 4))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(batch_size=6, grad_accum=4), "must divide evenly into --grad-accum 4"),
        (dict(batch_size=64), "fewer than one batch of 64; lower --batch-size"),
        (dict(lr=0.0), "--lr must be positive"),
        (dict(mask_probability=1.5), "--mask-probability must be in"),
        (dict(target_modules=["qkv"]), "Unknown LoRA target module"),
        (dict(mask_token="two tokens"), "pass --mask-token with a string that is a single token"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(overrides, message, tiny_base, tmp_path, texts_file):
    with pytest.raises(ValueError, match=message):
        train(_args(tiny_base, tmp_path, data=[str(texts_file)], **overrides))
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter-checkpoints").exists()


def test_existing_output_is_kept_without_overwrite(tiny_base, tmp_path, texts_file):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(_args(tiny_base, tmp_path, data=[str(texts_file)]))
    assert (out / "keep.txt").read_text() == "mine"


def test_infonce_on_scored_pairs_asks_for_a_threshold(tiny_base, tmp_path, sts_file):
    with pytest.raises(ValueError, match="Pass --positive-threshold"):
        train(_args(tiny_base, tmp_path, objective="supervised", data=[str(sts_file)], loss="infonce"))
    summary = train(_args(tiny_base, tmp_path, objective="supervised", data=[str(sts_file)], loss="infonce",
                          positive_threshold=3.0, max_steps=1))
    assert summary["examples"] == sum(1 for i in range(16) if (i * 7) % 6 >= 3)


def test_cli_train_writes_the_adapter_and_summary(tiny_base, tmp_path, texts_file, capsys):
    out = tmp_path / "cli-adapter"
    code = cli_main(["train", "mntp", "--base", str(tiny_base), "--data", str(texts_file), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert json.loads(capsys.readouterr().out)["objective"] == "mntp"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.json"} <= {p.name for p in out.iterdir()}
    code = cli_main(["train", "mntp", "--base", str(tiny_base), "--data", str(texts_file), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert code == 1 and "already exists" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base):
    from llama_encoder.training.distributed import Distributed
    from llama_encoder.training.model import load_training_model
    from llama_encoder.training.objectives import SimCSE

    grads = []
    for checkpointing in (False, True):
        model = load_training_model(base=str(tiny_base), lora_dropout=0.0, gradient_checkpointing=checkpointing,
                                    pooling="latent_attention")
        model.peft_model.train()
        with torch.no_grad():
            for name, param in model.trainable_parameters():
                if "lora_B" in name:
                    param.fill_(0.01)
        loss, _ = SimCSE(tokenizer=model.tokenizer, max_length=32).loss(model.encoder, {"texts": TEXTS}, Distributed())
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    terms = summation_terms("simcse", tiny_base)  # the recomputed forward pass may reorder what any step sums
    for name in grads[0]:
        assert_equal_up_to_summation_order(grads[1][name], grads[0][name], terms=terms, what=name)


def test_bf16_training_runs_and_evaluates_at_the_end(tiny_base, tmp_path, texts_file, sts_file):
    summary = train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)], dtype="bfloat16",
                          allow_slow_dtype=True, eval_sts=str(sts_file), eval_every=2, pooling="latent_attention"))
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert all(-100 <= e["spearman"] <= 100 for e in summary["evaluations"])
    assert summary["dtype"] == "bfloat16" and all(h["loss"] == h["loss"] for h in summary["history"])  # no NaN
    # the latent head was trained: it moved away from its initial values
    from llama_encoder.training.model import load_training_model

    initial = load_training_model(base=str(tiny_base), pooling="latent_attention", init_seed=42)
    trained = load_file(tmp_path / "adapter" / "pooling_head.safetensors")
    start = {f"latent_attention.{k}": v for k, v in initial.encoder.latent_attention.state_dict().items()}
    assert trained.keys() == start.keys()
    assert any(not torch.allclose(trained[k], start[k].float()) for k in trained)


def test_disk_full_leaves_no_adapter_or_checkpoint_and_says_how_much_was_needed(tiny_base, tmp_path, texts_file,
                                                                                  monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # a checkpoint's tensors, then (without checkpoints) the final adapter's weights fail to be written
    for target, name, save_every in ((loop, "save_file", 2), (PeftModel, "save_pretrained", 0)):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, full_disk)
            with pytest.raises(OSError, match=r"No space left on the device while writing .*: it needs about .*free"):
                train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)], save_every=save_every,
                            overwrite=True))
        assert not (tmp_path / "adapter").exists()
        leftovers = list(tmp_path.glob(".tmp-*")) + list((tmp_path / "adapter-checkpoints").glob("*"))
        assert leftovers == []


# --- one source for every default -------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_python_and_the_cli_train_the_same_recipe(objective, tiny_base, tmp_path, texts_file, sts_file):
    """Defaults come from TrainingArguments alone: a Python caller and the CLI, each leaving every option at its
    default, record (and train) the same arguments, LLM2Vec's SimCSE attention dropout of 0.3 included."""
    data = str(sts_file if objective == "supervised" else texts_file)
    train(TrainingArguments(objective=objective, out=str(tmp_path / "python"), data=[data], base=str(tiny_base),
                            max_steps=1, batch_size=4, show_progress=False))
    assert cli_main(["train", objective, "--base", str(tiny_base), "--data", data, "--out", str(tmp_path / "cli"),
                     "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 0
    python, cli = (json.loads((tmp_path / name / "training_args.json").read_text()) for name in ("python", "cli"))
    for recorded in (python, cli):
        recorded.pop("out"), recorded.pop("command")
    assert python == cli
    assert python["attention_dropout"] == {"mntp": 0.0, "simcse": 0.3, "supervised": 0.0}[objective]
    assert python["temperature"] == {"mntp": None, "simcse": 0.05, "supervised": 0.02}[objective]


def test_every_training_option_is_a_field_and_every_field_an_option():
    """The CLI is built from the dataclass: each field an objective takes has exactly one option, whose default
    is the field's own (argparse holds none) and whose help names its default."""
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    train_parser = commands.choices["train"]
    objectives = next(a for a in train_parser._actions if hasattr(a, "choices") and a.choices and "mntp" in a.choices)
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    for objective, parser in objectives.choices.items():
        dests = {action.dest for action in parser._actions if action.dest != "help"}
        expected = {name for name, f in fields.items() if f.metadata.get("cli", True)
                    and objective in f.metadata.get("objectives", (objective,))}
        assert dests == expected, objective
        for action in parser._actions:
            if action.dest != "help":
                assert action.default == "==SUPPRESS==", (objective, action.dest)
        lora_r = next(a for a in parser._actions if a.dest == "lora_r")
        assert lora_r.help == "LoRA rank r (default: 16)"
    given = vars(objectives.choices["mntp"].parse_args(["--data", "x", "--out", "o", "--bf16"]))
    assert {key: value for key, value in given.items() if key != "handler"} == {"data": ["x"], "out": "o",
                                                                                 "dtype": "bfloat16"}


def test_a_run_saved_with_bf16_resumes_as_dtype_bfloat16(tiny_base, tmp_path, texts_file, monkeypatch):
    """Checkpoints written before `--dtype` say `bf16: true`; resuming them with `--bf16` (now `--dtype bfloat16`)
    is the same run, and with the default float32 elsewhere it is not."""
    common = dict(objective="simcse", data=[str(texts_file)], max_steps=4, batch_size=4, save_every=2,
                  allow_slow_dtype=True)
    saved = loop.save_checkpoint

    def save_as_before_then_die(folder, step, model, optimizer, state, keep):
        legacy = dict(state["training_args"])
        legacy["bf16"] = legacy.pop("dtype") == "bfloat16"
        del legacy["allow_slow_dtype"]
        path = saved(folder, step, model, optimizer, {**state, "training_args": legacy}, keep)
        written = json.loads((path / "state.json").read_text())
        del written["compute_dtype"]
        (path / "state.json").write_text(json.dumps(written))
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_as_before_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_args(tiny_base, tmp_path, dtype="bfloat16", **common))
    monkeypatch.setattr(loop, "save_checkpoint", saved)
    with pytest.raises(ValueError, match=r"differ from the interrupted run \(dtype: 'bfloat16' -> 'float32'\)"):
        train(_args(tiny_base, tmp_path, resume=True, dtype="float32", **common))
    summary = train(_args(tiny_base, tmp_path, resume=True, dtype="bfloat16", **common))
    assert summary["steps"] == 4 and summary["dtype"] == "bfloat16" and len(summary["history"]) == 4


# --- the one merge ----------------------------------------------------------------------------------------------


def test_training_merges_earlier_adapters_exactly_as_convert_writes_them(tmp_path):
    """Two adapters on a bfloat16 base: the model trained on is the model `convert` writes, bit for bit (both add
    the deltas in float32 and round once; rounding after each adapter gives other weights)."""
    from llama_encoder.conversion_scripts.convert import convert
    from llama_encoder.training.model import load_training_model

    full = save_tiny_base(tmp_path / "float32")
    LlamaForCausalLM.from_pretrained(full, dtype=torch.bfloat16).save_pretrained(tmp_path / "bfloat16")
    AutoTokenizer.from_pretrained(full).save_pretrained(tmp_path / "bfloat16")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    save_lora_adapter(LlamaForCausalLM.from_pretrained(full), tmp_path / "first", seed=1, r=4, lora_alpha=8,
                      target_modules=targets)
    save_lora_adapter(LlamaForCausalLM.from_pretrained(full), tmp_path / "second", seed=2, r=2, lora_alpha=4,
                      target_modules=["q_proj", "v_proj"])
    adapters = [tmp_path / "first", tmp_path / "second"]

    trained_on = load_training_model(base=str(tmp_path / "bfloat16"), adapters=adapters, dtype=torch.bfloat16)
    state = trained_on.peft_model.unload().state_dict()
    result = convert(out=tmp_path / "encoder", base=str(tmp_path / "bfloat16"), adapters=adapters,
                     dtype="bfloat16")
    written = load_file(result.out_dir / "model.safetensors")
    assert set(written) == set(state)
    assert [name for name in written if not torch.equal(written[name], state[name])] == []
    # rounding to bfloat16 after each adapter, as training did before, lands elsewhere: the check can fail
    from llama_encoder.weights.lora import read_adapter
    from llama_encoder.weights.shards import read_tensors, resolve_base_files

    name = "layers.0.self_attn.q_proj.weight"
    one_at_a_time = read_tensors(resolve_base_files(tmp_path / "bfloat16"), [f"model.{name}"])[f"model.{name}"]
    for adapter in map(read_adapter, adapters):
        one_at_a_time = adapter.merge_into(name, one_at_a_time)  # back in bfloat16 after each
    assert one_at_a_time.dtype == torch.bfloat16 and not torch.equal(one_at_a_time, written[name])


# --- gradient accumulation and resuming ---------------------------------------------------------------------------


def test_mntp_gradient_accumulation_keeps_the_token_mean_of_the_global_batch(tmp_path, texts_file):
    """MNTP's loss is the mean over every masked token of the global batch, however it is split into micro-batches
    (whose masked-token counts differ), so loss and gradient norm do not depend on --grad-accum."""
    base = save_tiny_base(tmp_path / "base", lm_head_scale=50.0)
    first = {}
    for accumulation in (1, 2, 4):
        summary = train(_args(base, tmp_path, out=str(tmp_path / f"accumulate-{accumulation}"),
                              data=[str(texts_file)], batch_size=8, grad_accum=accumulation, max_steps=1,
                              lora_dropout=0.0, mask_probability=0.4, dtype="float32"))
        first[accumulation] = summary["history"][0]
    terms = summation_terms("mntp", base)  # micro-batches split the sums over tokens; nothing else changes
    for accumulation in (2, 4):
        for key in ("loss", "grad_norm"):
            assert_equal_up_to_summation_order(first[accumulation][key], first[1][key], terms=terms,
                                               dtype=torch.float32, what=f"{key}, --grad-accum {accumulation}")


def test_resume_with_a_changed_lora_rank_names_the_option_before_building_the_model(tiny_base, tmp_path,
                                                                                     texts_file, monkeypatch):
    common = _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch)
    monkeypatch.setattr(loop, "load_training_model", lambda **_: pytest.fail("the model was built first"))
    with pytest.raises(ValueError, match=r"arguments differ from the interrupted run \(lora_r: 16 -> 8\)"):
        train(_args(tiny_base, tmp_path, resume=True, lora_r=8, **common))

