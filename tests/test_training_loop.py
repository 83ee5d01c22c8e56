"""Training on the ecosystem's trainers (transformers' `Trainer` for MNTP, sentence-transformers' for SimCSE and
supervised) on a tiny base: it learns, writes adapters `convert` merges like peft, evaluates and logs where asked,
keeps MNTP's token mean under gradient accumulation, and refuses bad arguments before any work."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel
from llama_encoder.cli import build_parser
from llama_encoder.cli import main as cli_main
from llama_encoder.dtypes import half_support
from llama_encoder.errors import InputError
from llama_encoder.training import run as run_module
from llama_encoder.training.arguments import TrainingArguments
from llama_encoder.training.run import checkpoints, prepare_run, train
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.test_lora_merge import save_lora_adapter
from tests.tiny import one_torch_thread, save_tiny_base

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is as fast, and much faster on a loaded host (threads spin waiting for a core)."""
    with one_torch_thread():
        yield


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


def _summation_terms(base, *, pooling: str, length: int, texts: int, loss: int) -> int:
    """Summands two runs may add in different orders, for a loss and each gradient element: the forward and the
    backward pass through the same reductions (twice encoder_terms over the longest row), every token of the batch
    (each LoRA gradient sums over all of them), and the loss's own sums (`loss`)."""
    from transformers import LlamaConfig

    llama = LlamaConfig.from_pretrained(base).to_dict()
    model = LlamaEncoderModel(LlamaEncoderConfig(**{**llama, "pooling_mode": pooling}))
    return 2 * encoder_terms(model, length) + texts * length + loss


def _interrupt_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the next `train` stop (KeyboardInterrupt) right after the trainer has saved the checkpoint of `step`."""
    real = run_module.prepare_run

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise KeyboardInterrupt

    def prepare_then_interrupt(args):
        run = real(args)
        run.trainer.add_callback(Interrupt())
        return run

    monkeypatch.setattr(run_module, "prepare_run", prepare_then_interrupt)


# --- it learns --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["simcse", "supervised"])
def test_a_few_steps_reduce_the_loss(objective, tiny_base, tmp_path, texts_file, sts_file):
    data = texts_file if objective == "simcse" else sts_file
    summary = train(_args(tiny_base, tmp_path, objective=objective, data=[str(data)], max_steps=24, log_every=1,
                          batch_size=8, lr=1e-2, warmup_ratio=0.0, lora_dropout=0.0, attention_dropout=0.1))
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_mntp_loss_falls_on_repeated_texts(tmp_path, texts_file):
    # A random LM head of std 0.02 over unit-RMS states gives near-uniform logits that LoRA can hardly move.
    base = save_tiny_base(tmp_path / "base", lm_head_scale=50.0)
    summary = train(_args(base, tmp_path, data=[str(texts_file)], max_steps=30, batch_size=8, lr=2e-2, log_every=1,
                          warmup_ratio=0.0, lora_dropout=0.0, mask_probability=0.3))
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 30
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6


# --- what it writes ---------------------------------------------------------------------------------------------


def test_an_unknown_or_missing_reporting_integration_is_refused_before_work(tiny_base, tmp_path, texts_file,
                                                                           monkeypatch):
    import transformers.integrations

    with pytest.raises(InputError, match="--report-to nonsense: unknown; choose from .*tensorboard"):
        train(_args(tiny_base, tmp_path, data=[str(texts_file)], report_to=["nonsense"]))
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(InputError, match="--report-to wandb: not installed; pip install wandb"):
        train(_args(tiny_base, tmp_path, data=[str(texts_file)], report_to=["wandb"]))
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter-checkpoints").exists()


def test_matryoshka_dimensions_reach_the_checkpoint_where_vllm_and_the_card_read_them(tiny_base, tmp_path, sts_file):
    from llama_encoder.conversion_scripts.convert import convert

    adapter = tmp_path / "matryoshka"
    train(_args(tiny_base, tmp_path, objective="supervised", out=str(adapter), data=[str(sts_file)],
                matryoshka_dims=[32, 16], max_steps=2))
    assert json.loads((adapter / "pooling_config.json").read_text())["matryoshka_dimensions"] == [16, 32]
    for layout in ("native", "remote-code"):
        out = convert(out=tmp_path / layout, base=str(tiny_base), adapters=[adapter], format=layout).out_dir
        config = json.loads((out / "config.json").read_text())
        hidden = config["hidden_size"]
        assert config["is_matryoshka"] is True and config["matryoshka_dimensions"] == [16, 32, hidden]
        card = (out / "README.md").read_text()
        assert "Matryoshka embeddings: trained so that the first 16, 32 dimensions" in card
        assert "truncate_dim=16" in card
    plain = convert(out=tmp_path / "plain", base=str(tiny_base), untrained=False).out_dir
    assert "matryoshka_dimensions" not in json.loads((plain / "config.json").read_text())


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


def test_a_run_of_several_datasets_logs_each_ones_loss(tiny_base, tmp_path, sts_file):
    """With a log every step, each log holds the loss of the one dataset its step drew, equal to the logged loss;
    both datasets appear over the run."""
    records = [{"query": f"Where is thing {i}?", "positive": f"Thing {i} is in room {i * 7 % 11}."} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "recipe.json").write_text(json.dumps({"datasets": [
        {"name": "qa", "path": "qa.jsonl"}, {"name": "sts", "path": sts_file.name, "format": "sts",
                                             "loss": "cosent"}]}))
    summary = train(_args(tiny_base, tmp_path, objective="supervised", recipe=str(tmp_path / "recipe.json"), data=[],
                          max_steps=6, log_every=1, lora_dropout=0.0))
    drawn = []
    for entry in summary["history"]:
        per_set = {key: value for key, value in entry.items() if key.startswith("loss_")}
        assert len(per_set) == 1, entry
        ((key, value),) = per_set.items()
        assert value == pytest.approx(entry["loss"], abs=1e-4)  # both rounded to 4 decimals
        drawn.append(key)
    assert len(drawn) == 6 and set(drawn) == {"loss_qa", "loss_sts"}


def test_a_recipe_names_its_task_prompts_and_the_checkpoint_serves_them_by_name(tiny_base, tmp_path, sts_file):
    """A recipe with a retrieval task named `query` and an STS task: the adapter records both instructions by name
    and the template they were written with; the converted checkpoint saves both prompts in that template, stays
    native for stock Sentence Transformers, verifies and documents the task prompt, and stock
    `SentenceTransformer(path).encode(prompt_name="sts")` embeds like `Encoder` with the same prompt."""
    from sentence_transformers import SentenceTransformer

    from llama_encoder.configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, fill_instruction_template
    from llama_encoder.conversion_scripts.convert import convert
    from llama_encoder.encoding.encode import Encoder

    retrieval, similar = "Given a question, retrieve the sentence that answers it", "Retrieve semantically similar text"
    records = [{"query": f"Where is thing {i}?", "positive": f"Thing {i} is in room {i * 7 % 11}."} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "recipe.json").write_text(json.dumps({"datasets": [
        {"name": "qa", "path": "qa.jsonl", "instruction": retrieval, "prompt_name": "query"},
        {"name": "sts", "path": sts_file.name, "format": "sts", "loss": "cosent", "instruction": similar}]}))
    adapter = tmp_path / "tasks"
    train(_args(tiny_base, tmp_path, objective="supervised", recipe=str(tmp_path / "recipe.json"), data=[],
                out=str(adapter), max_steps=2, lora_dropout=0.0))
    record = json.loads((adapter / "training_args.json").read_text())
    assert record["instruction_template"] == DEFAULT_INSTRUCTION_TEMPLATE == "Instruct: {instruction}\nQuery:\n"
    assert record["prompt_instructions"] == {"query": retrieval, "sts": similar}

    result = convert(out=tmp_path / "encoder", base=str(tiny_base), adapters=[adapter])
    out = result.out_dir
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": fill_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, retrieval), "document": "",
                       "sts": fill_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, similar)}
    assert json.loads((out / "config.json").read_text())["instruction_template"] == DEFAULT_INSTRUCTION_TEMPLATE
    assert json.loads((out / "modules.json").read_text())[1]["type"] == "sentence_transformers.models.Pooling"
    report = result.verification
    assert report["prompts"] == ["query", "sts"]
    assert {check["name"] for check in report["checks"] if check.get("prompt") == "sts"} >= {
        "sentence_transformers_native_vs_reference", "automodel_vs_reference"}
    assert 'prompt_name="sts"' in (out / "README.md").read_text()

    texts = ["A cat sits on the mat.", "x", "Plants make sugar from light, water and air."]
    encoder = Encoder.from_pretrained(out, device="cpu", dtype="float32")
    ours = encoder.encode(texts, prompt_name="sts")
    stock = SentenceTransformer(str(out), device="cpu").encode(texts, prompt_name="sts")
    longest = max(len(encoder.tokenizer(prompts["sts"] + text)["input_ids"]) for text in texts)
    assert_equal_up_to_summation_order(stock, ours, terms=encoder_terms(encoder.model, longest))
    assert not np.allclose(ours, encoder.encode(texts, prompt_name="query"), atol=1e-3)  # another prompt


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(objective="supervised", instruction_template="Query: "),
         "--instruction-template must contain the placeholder"),
        (dict(batch_size=6, grad_accum=4), "must divide evenly into --grad-accum 4"),
        (dict(batch_size=64), "fewer than one batch of 64; lower --batch-size"),
        (dict(lr=0.0), "--lr must be positive"),
        (dict(mask_probability=1.5), "--mask-probability must be in"),
        (dict(target_modules=["qkv"]), "Unknown LoRA target module"),
        (dict(mask_token="two tokens"), "pass --mask-token with a string that is a single token"),
        (dict(objective="simcse", matryoshka_dims=[0, 32]), "--matryoshka-dims must be positive integers"),
        (dict(objective="simcse", matryoshka_dims=[32, 64, 128]),
         r"--matryoshka-dims \[128\] exceed the embedding size 64"),
        (dict(eval_sts="sts.csv"), "--eval-sts scores sentence embeddings during simcse and supervised"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(overrides, message, tiny_base, tmp_path, texts_file):
    with pytest.raises(ValueError, match=message):
        train(_args(tiny_base, tmp_path, data=[str(texts_file)], **overrides))
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter-checkpoints").exists()


def test_a_bad_matryoshka_dims_value_is_an_argparse_error(tiny_base, tmp_path, texts_file, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["train", "simcse", "--base", str(tiny_base), "--data", str(texts_file), "--out",
                  str(tmp_path / "adapter"), "--matryoshka-dims", "32,big"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--matryoshka-dims" in error and "expected comma-separated integers such as 64,128,256" in error
    assert not (tmp_path / "adapter").exists()


def test_existing_output_is_kept_without_overwrite(tiny_base, tmp_path, texts_file):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(_args(tiny_base, tmp_path, data=[str(texts_file)]))
    assert (out / "keep.txt").read_text() == "mine"


def test_infonce_on_scored_pairs_asks_for_a_threshold(tiny_base, tmp_path, sts_file):
    with pytest.raises(ValueError, match=r"Give it a positive_threshold \(--positive-threshold"):
        train(_args(tiny_base, tmp_path, objective="supervised", data=[str(sts_file)], loss="infonce"))
    # batches of 2: the 7 pairs kept repeat texts, and a batch holds no text twice
    summary = train(_args(tiny_base, tmp_path, objective="supervised", data=[str(sts_file)], loss="infonce",
                          positive_threshold=3.0, max_steps=1, batch_size=2))
    assert summary["examples"] == sum(1 for i in range(16) if (i * 7) % 6 >= 3)


def test_cli_train_writes_the_adapter_and_summary(tiny_base, tmp_path, texts_file, capsys):
    out = tmp_path / "cli-adapter"
    code = cli_main(["train", "mntp", "--base", str(tiny_base), "--data", str(texts_file), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    printed = capsys.readouterr().out  # the trainer's log lines, then the summary
    assert json.loads(printed[printed.index("{\n"):])["objective"] == "mntp"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.json"} <= {p.name for p in out.iterdir()}
    code = cli_main(["train", "mntp", "--base", str(tiny_base), "--data", str(texts_file), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert code == 1 and "already exists" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base, tmp_path, texts_file):
    """One SimCSE batch from the trainer's own dataloader, its loss from the trainer's loss, backward, with and
    without recomputing the layers (which really happens: each layer runs twice)."""
    grads, calls, lengths = [], [], []
    for checkpointing in (False, True):
        run = prepare_run(_args(tiny_base, tmp_path, objective="simcse", out=str(tmp_path / f"gc-{checkpointing}"),
                                data=[str(texts_file)], batch_size=8, lora_dropout=0.0, attention_dropout=0.0,
                                pooling="latent_attention", gradient_checkpointing=checkpointing, dtype="float32"))
        with torch.no_grad():
            for name, param in run.model.trainable_parameters():
                if "lora_B" in name:
                    param.fill_(0.01)
        count = [0]

        def counted(*_, count=count):
            count[0] += 1

        run.model.encoder.layers[0].self_attn.register_forward_pre_hook(counted)
        batch = next(iter(run.trainer.get_train_dataloader()))
        lengths.append(int(batch["anchor_attention_mask"].shape[1]))
        run.trainer.model.train()
        run.trainer.compute_loss(run.trainer.model, batch).backward()
        calls.append(count[0])
        grads.append({name: p.grad.clone() for name, p in run.model.trainable_parameters()})
    assert calls == [2, 4]  # anchor and positive; recomputed in the backward pass
    assert grads[0].keys() == grads[1].keys()
    terms = _summation_terms(tiny_base, pooling="latent_attention", length=max(lengths), texts=16, loss=64 + 16)
    for name in grads[0]:
        assert_equal_up_to_summation_order(grads[1][name], grads[0][name], terms=terms, what=name)


@pytest.mark.skipif(not half_support(torch.bfloat16, "cpu").native,
                    reason="bfloat16 is emulated on this CPU (about 30x slower than float32)")
def test_bf16_training_runs_and_evaluates(tiny_base, tmp_path, texts_file, sts_file):
    summary = train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)], dtype="bfloat16",
                          eval_sts=str(sts_file), eval_every=2, pooling="latent_attention", log_every=1))
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]  # scored at the end once, not twice
    assert all(-1 <= e["sts_spearman_cosine"] <= 1 for e in summary["evaluations"])
    assert summary["dtype"] == "bfloat16" and all(h["loss"] == h["loss"] for h in summary["history"])  # no NaN
    # the latent head was trained: it moved away from its initial values
    from llama_encoder.training.model import load_training_model

    initial = load_training_model(base=str(tiny_base), pooling="latent_attention", init_seed=42)
    trained = load_file(tmp_path / "adapter" / "pooling_head.safetensors")
    start = {f"latent_attention.{k}": v for k, v in initial.encoder.latent_attention.state_dict().items()}
    assert trained.keys() == start.keys()
    assert any(not torch.allclose(trained[k], start[k].float()) for k in trained)


def test_eval_sts_records_evaluations_in_the_training_summary(tiny_base, tmp_path, texts_file, sts_file):
    train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)], dtype="float32", max_steps=3,
                eval_sts=str(sts_file), eval_every=2))
    summary = json.loads((tmp_path / "adapter" / "training_summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [2, 3]  # every 2 steps, and always at the end
    for evaluation in summary["evaluations"]:
        assert {"sts_pearson_cosine", "sts_spearman_cosine"} <= set(evaluation)
        assert -1 <= evaluation["sts_spearman_cosine"] <= 1


def test_report_to_tensorboard_writes_event_files_beside_the_checkpoints(tiny_base, tmp_path, texts_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # dev extra

    train(_args(tiny_base, tmp_path, data=[str(texts_file)], max_steps=2, log_every=1, report_to=["tensorboard"]))
    events = list((tmp_path / "adapter-checkpoints").rglob("events.out.tfevents.*"))
    assert events and not list((tmp_path / "adapter").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2]


def test_disk_full_leaves_no_adapter_or_complete_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch):
    """The adapter files are peft's `save_pretrained`, in checkpoints (written by the trainer) and in the final
    adapter (written to a temporary sibling, renamed when complete)."""
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full_disk)
    # the final adapter: nothing under its name, no temporary sibling, and the error says how much was needed
    with pytest.raises(OSError, match=r"No space left on the device while writing .*: it needs about .*free"):
        train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)]))
    assert not (tmp_path / "adapter").exists() and list(tmp_path.glob(".tmp-*")) == []
    assert checkpoints(tmp_path / "adapter-checkpoints") == []
    # the first checkpoint: the same explanation, no adapter, and no checkpoint folder left at all
    with pytest.raises(OSError, match=r"No space left on the device while writing .*checkpoint-2: it needs about"):
        train(_args(tiny_base, tmp_path, objective="simcse", data=[str(texts_file)], save_every=2, overwrite=True))
    assert not (tmp_path / "adapter").exists() and list(tmp_path.glob(".tmp-*")) == []
    assert not list((tmp_path / "adapter-checkpoints").glob("checkpoint-*"))


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
    trained = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("python", "cli")]
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])


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
    given = vars(objectives.choices["mntp"].parse_args(["--data", "x", "--out", "o", "--bf16", "--report-to",
                                                        "tensorboard", "wandb"]))
    assert {key: value for key, value in given.items() if key != "handler"} == {
        "data": ["x"], "out": "o", "dtype": "bfloat16", "report_to": ["tensorboard", "wandb"]}
    given = vars(objectives.choices["supervised"].parse_args(["--recipe", "r.yaml", "--out", "o",
                                                              "--mini-batch-size", "8", "--matryoshka-dims", "16,32"]))
    assert {key: value for key, value in given.items() if key != "handler"} == {
        "recipe": "r.yaml", "out": "o", "mini_batch_size": 8, "matryoshka_dims": [16, 32]}


# --- resuming ---------------------------------------------------------------------------------------------------


def _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch, **extra) -> dict:
    """A SimCSE run stopped right after its first checkpoint is saved; returns the run's arguments."""
    common = dict(objective="simcse", data=[str(texts_file)], max_steps=4, batch_size=4, save_every=2, **extra)
    with monkeypatch.context() as patch:
        _interrupt_after_checkpoint(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train(_args(tiny_base, tmp_path, **common))
    assert [p.name for p in checkpoints(tmp_path / "adapter-checkpoints")] == ["checkpoint-2"]
    assert not (tmp_path / "adapter").exists()
    return common


def test_resume_refuses_changed_arguments(tiny_base, tmp_path, texts_file, monkeypatch):
    common = _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch)
    with pytest.raises(ValueError, match=r"arguments differ from the interrupted run \(lr: 0.005 -> 0.001\)"):
        train(_args(tiny_base, tmp_path, resume=True, **{**common, "lr": 1e-3}))
    with pytest.raises(FileExistsError, match="Pass --resume to continue it, or --overwrite"):
        train(_args(tiny_base, tmp_path, **common))


def test_resume_with_a_changed_lora_rank_names_the_option_before_building_the_model(tiny_base, tmp_path,
                                                                                     texts_file, monkeypatch):
    common = _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch)
    monkeypatch.setattr(run_module, "load_training_model", lambda **_: pytest.fail("the model was built first"))
    with pytest.raises(ValueError, match=r"arguments differ from the interrupted run \(lora_r: 16 -> 8\)"):
        train(_args(tiny_base, tmp_path, resume=True, lora_r=8, **common))


@pytest.mark.parametrize(
    ("saved", "template"),
    [
        (dict(objective="supervised", instruction="Find the pet"), "Instruct: {instruction}\nQuery: "),
        (dict(objective="supervised", recipe="recipe.yaml"), "Instruct: {instruction}\nQuery: "),
        (dict(objective="supervised", data=["sts.csv"]), "Instruct: {instruction}\nQuery:\n"),
        (dict(objective="mntp", data=["texts.txt"]), "Instruct: {instruction}\nQuery:\n"),
    ],
)
def test_a_run_saved_before_templates_were_recorded_resumes_with_the_template_it_used(saved, template):
    """Earlier versions wrote instructions as `...\\nQuery: ` and recorded no template: a run given an instruction
    (or a recipe) resumes with that template, so continuing it with today's default is refused as a change."""
    from llama_encoder.training.arguments import saved_arguments

    assert saved_arguments({"out": "adapter", **saved}).instruction_template == template


def test_a_run_saved_with_bf16_resumes_as_dtype_bfloat16(tiny_base, tmp_path, texts_file, monkeypatch):
    """Checkpoints written before `--dtype` say `bf16: true`; resuming them with `--bf16` (now `--dtype bfloat16`)
    is the same run, and with float32 it is not."""
    common = _interrupted_after_first_checkpoint(tiny_base, tmp_path, texts_file, monkeypatch, dtype="bfloat16",
                                                 allow_slow_dtype=True)
    saved = tmp_path / "adapter-checkpoints" / "checkpoint-2" / "training_args.json"
    legacy = json.loads(saved.read_text())
    legacy["bf16"] = legacy.pop("dtype") == "bfloat16"
    del legacy["allow_slow_dtype"], legacy["compute_dtype"]
    saved.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"differ from the interrupted run \(dtype: 'bfloat16' -> 'float32'\)"):
        train(_args(tiny_base, tmp_path, resume=True, **{**common, "dtype": "float32"}))
    summary = train(_args(tiny_base, tmp_path, resume=True, log_every=1, **common))
    assert summary["steps"] == 4 and summary["dtype"] == "bfloat16"
    # steps 3 and 4 ran, logged at the resumed run's own --log-every (the interrupted run's was 10)
    assert [h["step"] for h in summary["history"]] == [3, 4]


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


# --- gradient accumulation --------------------------------------------------------------------------------------


def test_mntp_gradient_accumulation_keeps_the_token_mean_of_the_global_batch(tmp_path, texts_file):
    """MNTP's loss is the mean over every masked token of the global batch, however it is split into micro-batches
    (whose masked-token counts differ), so the first step's loss and gradient norm, as the trainer logs them, do
    not depend on --grad-accum."""
    base = save_tiny_base(tmp_path / "base", lm_head_scale=50.0)
    first = {}
    for accumulation in (1, 2, 4):
        summary = train(_args(base, tmp_path, out=str(tmp_path / f"accumulate-{accumulation}"),
                              data=[str(texts_file)], batch_size=8, grad_accum=accumulation, max_steps=1,
                              log_every=1, lora_dropout=0.0, mask_probability=0.4, dtype="float32"))
        first[accumulation] = summary["history"][0]
    assert first[1]["grad_norm"] > 0
    length = max(len(ids) for ids in AutoTokenizer.from_pretrained(base)(TEXTS)["input_ids"])
    vocab = LlamaForCausalLM.config_class.from_pretrained(base).vocab_size
    # micro-batches split the sums over tokens; nothing else changes
    terms = _summation_terms(base, pooling="mean", length=length, texts=8, loss=64 + vocab)
    for accumulation in (2, 4):
        for key in ("loss", "grad_norm"):
            assert_equal_up_to_summation_order(first[accumulation][key], first[1][key], terms=terms,
                                               dtype=torch.float32, what=f"{key}, --grad-accum {accumulation}")


def test_a_recipe_can_mine_negatives_with_the_model_being_trained(tiny_base, tmp_path):
    records = [{"query": f"Where is thing {i}?", "positive": f"Thing {i} is in room {i * 7 % 11}."} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "recipe.json").write_text(json.dumps({"datasets": [
        {"name": "things", "path": "pairs.jsonl", "instruction": "Find where it is", "mine_negatives": 2,
         "mining": {"relative_margin": None}}]}))
    run = prepare_run(_args(tiny_base, tmp_path, objective="supervised", recipe=str(tmp_path / "recipe.json"),
                            data=[]))
    dataset = run.trainer.train_dataset["things"]
    assert dataset.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    positives = {r["query"]: r["positive"] for r in records}
    for row in dataset:
        assert row["negative_1"] != row["negative_2"]
        assert positives[row["anchor"]] not in (row["negative_1"], row["negative_2"])
        assert {row["negative_1"], row["negative_2"]} <= set(positives.values())
