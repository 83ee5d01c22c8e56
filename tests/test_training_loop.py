"""The training loop on a tiny base: it learns, resumes exactly, writes adapters `convert` merges like peft, and
refuses bad arguments before any work."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from llama_encoder.cli import main as cli_main
from llama_encoder.training import loop
from llama_encoder.training.loop import TrainingArguments, epoch_order, learning_rate, train
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


def test_resume_refuses_changed_arguments(tiny_base, tmp_path, texts_file, monkeypatch):
    common = dict(objective="simcse", data=[str(texts_file)], max_steps=4, batch_size=4, save_every=2)
    saved = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_args(tiny_base, tmp_path, **common))
    monkeypatch.setattr(loop, "save_checkpoint", saved)
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

    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[mntp, supervised])
    assert result.pooling_mode == "latent_attention"

    # independently: the MNTP adapter merged by our loader, the supervised adapter merged by peft, the head loaded
    reference = load_training_model(base=str(tiny_base), adapters=[mntp], pooling="latent_attention")
    encoder = reference.peft_model.unload()  # MNTP merged into its weights, the fresh LoRA layers removed
    model = PeftModel.from_pretrained(encoder, supervised).merge_and_unload().eval()
    model.load_state_dict({k: v for k, v in head.items()}, strict=False)
    texts = ["The cat sat on the mat.", "Where is the cat?", "Plants make sugar."]
    expected = Encoder(model, reference.tokenizer).encode(texts)
    converted = Encoder.from_pretrained(result.out_dir, device="cpu").encode(texts)
    torch.testing.assert_close(torch.as_tensor(converted), torch.as_tensor(expected), atol=1e-5, rtol=1e-4)


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
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_training_runs_and_evaluates_at_the_end(tiny_base, tmp_path, texts_file, sts_file):
    summary = train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)], bf16=True,
                          eval_sts=str(sts_file), eval_every=2, pooling="latent_attention"))
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert all(-100 <= e["spearman"] <= 100 for e in summary["evaluations"])
    assert summary["bf16"] and all(h["loss"] == h["loss"] for h in summary["history"])  # no NaN
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
