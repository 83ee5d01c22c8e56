"""`train(TrainingArguments)`: one run of MNTP, SimCSE or supervised training on the ecosystem's trainers.

MNTP runs on transformers' `Trainer` (`training.mntp`), SimCSE and supervised on sentence-transformers'
`SentenceTransformerTrainer` (`training.contrastive`, `training.st_module`). Both are configured from our
`TrainingArguments` alone (`trainer_arguments` maps each option onto the trainers' own arguments) and checkpoint only
what a run trains, in the adapter layout `convert` reads. Before any model is built: the arguments, the data (every
bad record named `file:line`), the output folder and, on `--resume`, the interrupted run's arguments are checked.

Outputs: checkpoints in `<out>-checkpoints/checkpoint-N/` (the adapter files, `training_args.json`, and the trainer's
optimizer, scheduler, RNG and state files), and at the end the adapter folder `<out>`, written to a temporary sibling
and renamed into place when complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_directory, check_destination, explain_disk_full
from ..dtypes import describe_compute_dtype, resolve_compute_dtype
from ..errors import InputError, OutputExistsError
from ..readers import read_sts
from ..weights.lora import PROMPT_INSTRUCTIONS_KEY
from .adapter import ARGS_NAME, SUMMARY_NAME, load_trained_tensors, write_adapter_files
from .arguments import TrainingArguments, resumable_fields, saved_arguments
from .data import read_texts
from .model import TrainingModel, load_training_model, resolve_mask_token
from .recipe import read_recipe, specs_from_files

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_NAME = "run_progress.json"  # tokens and training seconds up to a checkpoint
_DTYPE_KEY = "compute_dtype"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _attention_backend(name: str, device: str) -> str:
    # On CPU, sdpa's fused backward is slow for short bf16 rows: eager trained SmolLM2 1.4x faster (32 x 13 tokens).
    if name == "auto":
        return "sdpa" if device.startswith("cuda") else "eager"
    return name


# ---- checkpoints -----------------------------------------------------------------------------------------------


def _complete(checkpoint: Path) -> bool:
    """The trainer writes `trainer_state.json` last: a checkpoint whose state file reads whole is complete."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (checkpoint / ARGS_NAME).is_file()


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (one cut short by a kill is skipped)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and _complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _check_resumable(checkpoint: Path, args: TrainingArguments, compute_dtype: torch.dtype) -> None:
    """Refuse to resume from `checkpoint` with arguments that change the result, naming each changed option; read
    from its training_args.json alone, before any model is built. The dtype is compared as computed in."""
    state = json.loads((checkpoint / ARGS_NAME).read_text())
    saved = asdict(saved_arguments(state))
    saved_dtype = state.get(_DTYPE_KEY) or (saved["dtype"] if saved["dtype"] != "auto" else None)
    current = asdict(args)
    skipped = (*resumable_fields(), "dtype")
    changes = [(key, saved.get(key), current[key]) for key in sorted(current)
               if key not in skipped and saved.get(key) != current[key]]
    if saved_dtype != _dtype_name(compute_dtype):
        changes.append(("dtype", saved_dtype, _dtype_name(compute_dtype)))
    if changes:
        details = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in changes[:5])
        raise InputError(f"Cannot resume from {checkpoint}: these arguments differ from the interrupted run "
                         f"({details}). Resume with the same arguments, or pass --overwrite to start over.")


def _prepare_output(args: TrainingArguments, is_main: bool) -> Path | None:
    """Check the output and checkpoint folders; returns the checkpoint to resume from, if any."""
    check_destination(args.out, overwrite=args.overwrite or args.resume)
    folder = args.checkpoint_dir
    found = checkpoints(folder)
    if args.resume:
        if not found:
            logger.warning("--resume: no checkpoint in %s; starting from step 0.", folder)
            return None
        logger.info("--resume: continuing from %s.", found[-1])
        return found[-1]
    if found and not args.overwrite:
        raise OutputExistsError(f"{folder} holds checkpoints of an earlier run ({found[-1].name}). Pass --resume to "
                                "continue it, or --overwrite to start over.")
    if folder.exists() and args.overwrite and is_main:
        shutil.rmtree(folder)
    return None


class AdapterCheckpoints:
    """Trainer mixin: a checkpoint holds the trained tensors only (the adapter layout) and the run's arguments;
    resuming copies them back into the model being trained. The optimizer, scheduler, RNG and data position are
    the trainer's own files."""

    run_model: TrainingModel
    run_record: dict
    run_progress = None  # () -> {"tokens", "seconds"} so far, saved beside each checkpoint

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        folder = Path(output_dir or self.args.output_dir)
        if self.run_progress is not None:
            (folder / PROGRESS_NAME).parent.mkdir(parents=True, exist_ok=True)
            (folder / PROGRESS_NAME).write_text(json.dumps(self.run_progress()) + "\n")
        write_adapter_files(self.run_model, folder, contrastive=self.run_model.lm_head is None,
                            matryoshka_dims=self.run_record.get("matryoshka_dims"))
        (folder / ARGS_NAME).write_text(json.dumps(self.run_record, indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        load_trained_tensors(self.run_model, resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        """The trainer's checkpoint; on a full disk the partial folder is removed (a --resume then takes the
        previous one) and the error says how much a checkpoint needs."""
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            folder = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            shutil.rmtree(folder, ignore_errors=True)
            trained = sum(p.numel() * 4 for _, p in self.run_model.trainable_parameters())
            raise explain_disk_full(exc, folder, 3 * trained) from exc  # + AdamW's two moments


def _current_intervals():
    """A callback that applies this run's --log-every, --eval-every and --save-every on --resume: transformers
    restores the interrupted run's intervals with its state, yet they may change on resume (`resumable`)."""
    from transformers import TrainerCallback

    class CurrentIntervals(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            state.compute_steps(args, state.max_steps)

    return CurrentIntervals()


def _stop_at_step(step: int):
    """A callback that ends the run after optimizer step `step` with a checkpoint (--stop-at-step): the schedule
    stays the full run's, so a later --resume continues exactly where this one stopped."""
    from transformers import TrainerCallback

    class StopAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = control.should_save = True

    return StopAtStep()


class _TokenCounter:
    """Counts the real tokens the model is trained on (a forward pre-hook on the encoder in training mode)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.tokens = 0
        encoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if module.training and torch.is_grad_enabled() and mask is not None:
            self.tokens += int(mask.sum())


def _logged_progress(trainer, show: bool) -> None:
    """The trainer's log lines go to `logging` (stdout stays the CLI's JSON summary); tqdm shows the steps when
    `show`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class LoggedProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
                logger.info("step %d: %s", state.global_step, shown)

    class LoggedOnly(TrainerCallback):
        on_log = LoggedProgress.on_log

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LoggedProgress() if show else LoggedOnly())


def _train_clock():
    """A callback timing the training loop itself (first step to last, evaluations and checkpoints included;
    model building, data reading and the trainer's set-up excluded), for tokens/s."""
    from transformers import TrainerCallback

    class TrainClock(TrainerCallback):
        seconds = 0.0  # before this process's part (a resumed run: the interrupted run's)
        _started = None

        def elapsed(self) -> float:
            return self.seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

        def on_train_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds, self._started = self.elapsed(), None

    return TrainClock()


# ---- trainer arguments -----------------------------------------------------------------------------------------


def trainer_arguments(args: TrainingArguments, *, compute_dtype: torch.dtype, device: str, sentence_transformers: bool,
                      prompts: dict | None = None, no_duplicates: bool = True, evaluate: bool = False):
    """Our options mapped onto the trainers' arguments (transformers' `TrainingArguments`, or the
    sentence-transformers subclass with its samplers and prompts). Nothing else configures the trainers."""
    world = _world_size()
    per_step = args.grad_accum * world
    if args.batch_size % per_step:
        raise InputError(f"--batch-size {args.batch_size} must divide evenly into --grad-accum {args.grad_accum} x "
                         f"{world} process(es); use a multiple of {per_step}.")
    show = args.show_progress if args.show_progress is not None else True
    values = dict(
        output_dir=str(args.checkpoint_dir),
        per_device_train_batch_size=args.batch_size // per_step,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=device == "cpu",
        logging_strategy="steps",
        logging_steps=max(1, args.log_every),
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500,
        save_total_limit=args.keep_checkpoints,
        eval_strategy="steps" if evaluate and args.eval_every else "no",
        eval_steps=args.eval_every or None,
        report_to=list(args.report_to) or "none",
        disable_tqdm=not show,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )
    if not sentence_transformers:
        from transformers import TrainingArguments as HFTrainingArguments

        if args.group_by_length:
            values["train_sampling_strategy"] = "group_by_length"
        return HFTrainingArguments(**values)
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    if args.group_by_length:
        from functools import partial

        from .sampler import LengthGroupedBatchSampler

        batch_sampler = partial(LengthGroupedBatchSampler, deduplicate=no_duplicates)
    else:
        batch_sampler = BatchSamplers.NO_DUPLICATES if no_duplicates else BatchSamplers.BATCH_SAMPLER
    return SentenceTransformerTrainingArguments(
        **values,
        batch_sampler=batch_sampler,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        prompts=prompts or None,
    )


# ---- the run ---------------------------------------------------------------------------------------------------


def _build_model(args: TrainingArguments, compute_dtype: torch.dtype, device: str) -> TrainingModel:
    return load_training_model(
        base=args.base, gguf=args.gguf, adapters=args.adapters, pooling=args.pooling,
        with_lm_head=args.objective == "mntp", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=tuple(args.target_modules),
        attention_dropout=args.attention_dropout, dtype=compute_dtype,
        device=device, gradient_checkpointing=args.gradient_checkpointing, cache_dir=args.cache_dir,
        attn_implementation=_attention_backend(args.attn_implementation, device),
        init_seed=args.seed,
    )


def _dataset_specs(args: TrainingArguments):
    if args.recipe:
        return read_recipe(args.recipe)
    return specs_from_files(args.data, data_format=args.data_format, instruction=args.instruction, loss=args.loss,
                            positive_threshold=args.positive_threshold, max_negatives=args.max_negatives)


def _read_contrastive_data(args: TrainingArguments) -> tuple[list, dict[str, str]]:
    """The run's training sets, read and checked, and the task prompts they train by name (`named_prompts`)."""
    from .contrastive import named_prompts, read_training_sets

    sets = read_training_sets(args.objective, _dataset_specs(args), instruction_template=args.instruction_template,
                              seed=args.seed)
    for training_set in sets:
        if len(training_set) < args.batch_size:
            raise InputError(f"Dataset {training_set.name} holds {len(training_set)} examples, fewer than one batch "
                             f"of {args.batch_size}; lower --batch-size or add data (each batch comes from one "
                             "dataset).")
    return sets, named_prompts(sets)


def _mine(sets, st_model, args: TrainingArguments):
    """Replace the negatives of datasets whose spec asks for mining (`mine_negatives`), mined with the model as it
    is before training (the base with the earlier adapters merged)."""
    from .contrastive import triples_set
    from .data import Triple
    from .mine import MiningSettings, mine_negatives

    mined = []
    for training_set in sets:
        spec = training_set.spec
        if spec is None or not spec.mine_negatives or training_set.kind != "infonce":
            mined.append(training_set)
            continue
        columns = training_set.columns
        triples = [Triple(query=q, positive=p)
                   for q, p in zip(columns["anchor"], columns["positive"], strict=True)]
        settings = MiningSettings.from_mapping({**spec.mining, "num_negatives": spec.mine_negatives},
                                               where=f"dataset {spec.name}: mining")
        prompt = training_set.prompts.get("anchor")
        with torch.no_grad():
            result = mine_negatives(st_model, triples, settings=settings, query_prompt=prompt or "",
                                    show_progress=args.show_progress is not False)
        mined.append(triples_set(training_set.name, result, prompt, spec, training_set.instruction,
                                 training_set.prompt_name))
        logger.info("Dataset %s: mined %d negatives for %d of %d queries", training_set.name, spec.mine_negatives,
                    len(result), len(triples))
    return mined


def _check_reporting(names: list[str]) -> None:
    """Refuse a `--report-to` integration transformers does not know or cannot find installed, before any work."""
    if not names or names in (["none"], ["all"]):
        return
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise InputError(f"--report-to {' '.join(unknown)}: unknown; choose from "
                         f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, none or all.")
    missing = [name for name in names if name not in get_available_reporting_integrations()]
    if missing:
        raise InputError(f"--report-to {' '.join(missing)}: not installed; pip install {' '.join(missing)}, or drop "
                         "the option.")


def _sts_evaluator(args: TrainingArguments):
    if not args.eval_sts:
        return None
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    pairs = read_sts(args.eval_sts)
    return EmbeddingSimilarityEvaluator([a for a, _, _ in pairs], [b for _, b, _ in pairs],
                                        [float(s) for _, _, s in pairs], name="sts", show_progress_bar=False,
                                        batch_size=32)


def _mntp_dataset(args: TrainingArguments, tokenizer):
    from datasets import Dataset

    texts = read_texts(args.data)
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "example_id": list(range(len(texts)))})


@dataclass
class Run:
    """A run ready to train: the trainer built around the model, and what the summary needs."""

    args: TrainingArguments
    trainer: object
    model: TrainingModel
    record: dict
    sets: list | None
    counter: _TokenCounter
    resume_from: Path | None
    compute_dtype: torch.dtype
    device: str
    clock: object


def prepare_run(args: TrainingArguments) -> Run:
    """Check everything, then build the model and its trainer (nothing is trained yet).

    Raises a `LlamaEncoderError` (`InputError`, `MissingInputError`, `OutputExistsError`, `SlowDtypeError`, ...) for
    bad arguments, data or outputs before any model is built."""
    args.validate()
    args = args.resolved()
    if args.threads:
        torch.set_num_threads(args.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and _world_size() > 1:
        device = f"cuda:{local_rank}"
    compute_dtype = resolve_compute_dtype(args.dtype, device, allow_slow_dtype=args.allow_slow_dtype)
    contrastive = args.objective != "mntp"

    # Everything that can be refused is refused here, before a model is built.
    if args.eval_sts and not contrastive:
        raise InputError("--eval-sts scores sentence embeddings during simcse and supervised training; MNTP trains "
                         "no embedding yet. Score the MNTP adapter after `llama-encoder convert` "
                         "(`llama-encoder evaluate`), or drop --eval-sts.")
    sets, prompt_instructions = _read_contrastive_data(args) if contrastive else (None, {})
    prompts = {s.name: s.prompts for s in sets if s.prompts} if contrastive else None
    if not contrastive:
        count = len(read_texts(args.data))
        if count < args.batch_size:
            raise InputError(f"The data holds {count} examples, fewer than one batch of {args.batch_size}; lower "
                             "--batch-size or add data.")
    _check_reporting(args.report_to)
    evaluator = _sts_evaluator(args)
    resume_from = _prepare_output(args, is_main)
    if resume_from is not None:
        _check_resumable(resume_from, args, compute_dtype)
    no_duplicates = contrastive and any(s.kind == "infonce" for s in sets)
    trainer_args = trainer_arguments(args, compute_dtype=compute_dtype, device=device,
                                     sentence_transformers=contrastive, evaluate=evaluator is not None,
                                     prompts=prompts, no_duplicates=no_duplicates)
    logger.info("Training in %s (--dtype %s)", describe_compute_dtype(compute_dtype, device), args.dtype)

    model = _build_model(args, compute_dtype, device)
    counter = _TokenCounter(model.encoder)
    # the task prompts trained, by name, beside the template they were written with (args.instruction_template)
    record = {**asdict(args), _DTYPE_KEY: _dtype_name(compute_dtype), PROMPT_INSTRUCTIONS_KEY: prompt_instructions}
    if contrastive:
        trainer, sets = _contrastive_trainer(args, model, sets, trainer_args, evaluator)
    else:
        trainer = _mntp_trainer(args, model, trainer_args)
    trainer.run_model, trainer.run_record = model, record
    trainer.add_callback(_current_intervals())
    if args.stop_at_step is not None:
        trainer.add_callback(_stop_at_step(args.stop_at_step))
    clock = _train_clock()
    trainer.add_callback(clock)
    _logged_progress(trainer, args.show_progress is not False)
    if resume_from is not None and (resume_from / PROGRESS_NAME).is_file():
        progress = json.loads((resume_from / PROGRESS_NAME).read_text())
        counter.tokens, clock.seconds = int(progress["tokens"]), float(progress["seconds"])
    trainer.run_progress = lambda: {"tokens": counter.tokens, "seconds": round(clock.elapsed(), 3)}
    return Run(clock=clock, args=args, trainer=trainer, model=model, record=record, sets=sets, counter=counter,
               resume_from=resume_from, compute_dtype=compute_dtype, device=device)


def train(args: TrainingArguments) -> dict:
    """Run one training job and write the adapter folder `args.out`; returns the training summary.

    Raises a `LlamaEncoderError` for bad arguments, data or outputs before any training starts (`prepare_run`)."""
    run = prepare_run(args)
    args, trainer = run.args, run.trainer
    output = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from is not None else None)
    seconds = run.clock.seconds
    if trainer.state.global_step == 0:
        raise InputError("No training step ran: no full batch could be formed (each batch comes from one dataset and "
                         "holds no duplicate text); lower --batch-size or add data.")
    if getattr(trainer, "evaluator", None) is not None and not any(
            entry.get("step") == trainer.state.global_step and any(key.startswith("eval_sts") for key in entry)
            for entry in trainer.state.log_history):
        trainer.evaluate()  # --eval-sts is always scored at the end
    summary = _summary(run, seconds, output.training_loss)
    if trainer.is_world_process_zero():
        _write_adapter(args, run.model, run.record, summary)
        logger.info("Wrote adapter %s (%d steps, %.0f tok/s)", args.out, summary["steps"],
                    summary["tokens_per_second"])
        if args.stop_at_step is not None and summary["steps"] < summary["scheduled_steps"]:
            logger.info("Stopped at step %d of %d (--stop-at-step); --resume continues the run", summary["steps"],
                        summary["scheduled_steps"])
        elif summary["steps"] < summary["scheduled_steps"]:  # the batch samplers' lengths are estimates
            logger.info("The data gave %d batches of the %d the schedule planned (a batch holds no duplicate text, "
                        "so some texts did not fill one)", summary["steps"], summary["scheduled_steps"])
    if _world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def _contrastive_trainer(args, model, sets, trainer_args, evaluator):
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    from .contrastive import build_loss, training_datasets
    from .st_module import TrainingEncoder

    class ContrastiveTrainer(AdapterCheckpoints, SentenceTransformerTrainer):
        """Sentence Transformers' trainer that also logs each dataset's mean loss since the last log
        (`loss_<dataset>`) in a run of several: their losses differ in kind (CoSENT's are larger than InfoNCE's), so
        the one logged `loss` moves with the datasets the steps happened to draw."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.set_losses: dict[str, tuple] = {}  # dataset -> (summed loss, steps) since the last log

        def add_model_card_callback(self, default_args_dict) -> None:
            """No sentence-transformers model card: `convert` writes the checkpoint's card."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            name = inputs.get("dataset_name")  # popped by the parent
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training and name is not None and len(sets) > 1:
                loss = (result[0] if return_outputs else result).detach()
                total, count = self.set_losses.get(name, (0.0, 0))
                self.set_losses[name] = (total + loss, count + 1)
            return result

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs and self.set_losses:
                logs = {**logs, **{f"loss_{name}": round(float(total) / count, 4)
                                   for name, (total, count) in self.set_losses.items()}}
                self.set_losses = {}
            super().log(logs, *args, **kwargs)

    st_model = SentenceTransformer(modules=[TrainingEncoder(model, args.max_length)],
                                   device=str(next(model.encoder.parameters()).device))
    if any(s.spec is not None and s.spec.mine_negatives for s in sets):
        sets = _mine(sets, st_model, args)
    if args.matryoshka_dims:
        too_large = [d for d in args.matryoshka_dims if d > model.encoder.config.hidden_size]
        if too_large:
            raise InputError(f"--matryoshka-dims {too_large} exceed the embedding size "
                             f"{model.encoder.config.hidden_size}; use dimensions up to it.")
    kinds = {s.kind for s in sets}
    if args.mini_batch_size and "cosent" in kinds:
        logger.warning("--mini-batch-size (GradCache) applies to the InfoNCE datasets; CoSENT datasets train on "
                       "whole batches.")
    shared = {kind: build_loss(st_model, kind, temperature=args.temperature, cosent_scale=args.cosent_scale,
                               mini_batch_size=args.mini_batch_size, matryoshka_dims=args.matryoshka_dims,
                               gather=_world_size() > 1)
              for kind in kinds}
    datasets = training_datasets(sets)
    trainer = ContrastiveTrainer(model=st_model, args=trainer_args, train_dataset=datasets,
                                 loss={s.name: shared[s.kind] for s in sets}, evaluator=evaluator)
    return trainer, sets


def _mntp_trainer(args, model, trainer_args):
    from transformers import Trainer

    from .mntp import MNTPCollator, MNTPModel, epoch_setter

    class MNTPTrainer(AdapterCheckpoints, Trainer):
        pass

    collator = MNTPCollator(tokenizer=model.tokenizer, probability=args.mask_probability, seed=args.seed,
                            mask_token_id=resolve_mask_token(model.tokenizer, args.mask_token))
    return MNTPTrainer(model=MNTPModel(model), args=trainer_args, train_dataset=_mntp_dataset(args, model.tokenizer),
                       data_collator=collator, callbacks=[epoch_setter(collator)])


def _summary(run: Run, seconds: float, mean_loss: float) -> dict:
    args, model, trainer, sets = run.args, run.model, run.trainer, run.sets
    tokens, compute_dtype, device = run.counter.tokens, run.compute_dtype, run.device
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    evaluations = [{"step": entry["step"], **{k.removeprefix("eval_"): v for k, v in entry.items()
                                              if k.startswith("eval_sts")}}
                   for entry in trainer.state.log_history if any(k.startswith("eval_sts") for k in entry)]
    last = history[-10:]
    return {
        "objective": args.objective,
        "steps": trainer.state.global_step,
        "scheduled_steps": trainer.state.max_steps,  # more than steps: --stop-at-step, or fewer full batches
        "examples": sum(len(s) for s in sets) if sets is not None else len(trainer.train_dataset),
        "datasets": {s.name: len(s) for s in sets} if sets is not None else None,
        "batch_size": args.batch_size,
        "tokens": tokens * _world_size(),
        "wall_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens * _world_size() / max(seconds, 1e-9), 1),
        "final_loss": sum(h["loss"] for h in last) / len(last) if last else mean_loss,
        "mean_loss": mean_loss,
        "evaluations": evaluations,
        "base": model.base.name,
        "merged_adapters": model.merged_adapters,
        "world_size": _world_size(),
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": _dtype_name(compute_dtype),
        "dtype_choice": describe_compute_dtype(compute_dtype, device),
        "command": args.command or " ".join(sys.argv),
        "history": history,
    }


def _write_adapter(args: TrainingArguments, model: TrainingModel, record: dict, summary: dict) -> Path:
    out = Path(args.out).expanduser().absolute()
    needed = sum(p.numel() * 4 for _, p in model.trainable_parameters())
    with atomic_directory(out, overwrite=args.overwrite or args.resume, needed_bytes=needed) as tmp:
        write_adapter_files(model, tmp, contrastive=args.objective != "mntp", matryoshka_dims=args.matryoshka_dims)
        (tmp / ARGS_NAME).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out


__all__ = ["AdapterCheckpoints", "Run", "checkpoints", "prepare_run", "train", "trainer_arguments"]
