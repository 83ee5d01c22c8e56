"""Everything that defines a training run: one field per option, with its default, its help text and how the command
line spells it. `llama-encoder train` is built from these fields (`training.cli`), so a Python caller and the CLI
train the same recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, POOLING_MODES
from ..dtypes import DTYPE_CHOICES
from ..errors import InputError
from ..weights.lora import trained_instruction_template

OBJECTIVES = ("mntp", "simcse", "supervised")
CONTRASTIVE = ("simcse", "supervised")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per-objective defaults of the options left at None: LLM2Vec's values.
DEFAULT_TEMPERATURE = {"simcse": 0.05, "supervised": 0.02}
DEFAULT_ATTENTION_DROPOUT = {"simcse": 0.3, "supervised": 0.0}
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2")
DATA_FORMATS = ("auto", "jsonl", "csv", "sts")
LOSSES = ("auto", "infonce", "cosent")


def option(default=dataclasses.MISSING, *, help: str, default_factory=dataclasses.MISSING, **cli) -> dataclasses.Field:
    """A field with its help text and its command-line spelling. `cli` keys: `group` (the --help section),
    `exclusive` (a mutually exclusive group), `flag` (the option's name when it is not `--field-name`), `metavar`,
    `choices`, `nargs` ("+" for a list given at once; other lists repeat the option), `action` ("store_false" for a
    `--no-...` flag), `alias` (another flag and the value it stands for), `objectives` (the objectives that take it;
    default all), `resumable` (a change that does not change the result, allowed on --resume), `cli=False` (not an
    option)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


@dataclass
class TrainingArguments:
    """Everything that defines a training run (the CLI's options). `temperature` and `attention_dropout` default per
    objective (`resolved()` fills them in)."""

    objective: str = option(help="the training objective: mntp, simcse or supervised", cli=False)
    out: str = option(help="the adapter folder to write (convert takes it with --adapter); checkpoints go to "
                      "DIR-checkpoints", metavar="DIR")
    data: list[str] = option(help="training data file; repeat for several (supervised and simcse: each file is one "
                             "dataset, and each batch comes from one dataset)", metavar="FILE", default_factory=list)
    base: str | None = option(None, help="base model: a local Hugging Face folder or a Hub repo id (default: the "
                              "embedded SmolLM2-135M-Instruct)", exclusive="source")
    gguf: str | None = option(None, help="base model as a GGUF file of a Llama, Mistral, Qwen2, Qwen3 or Gemma3 "
                              "(text) model",
                              exclusive="source")
    adapters: list[str] = option(help="a LoRA adapter merged into the base before training (e.g. the MNTP adapter "
                                 "before SimCSE or supervised); repeat to merge several in order",
                                 default_factory=list, flag="--adapter", metavar="PATH")
    max_steps: int | None = option(None, help="optimizer steps (default: --epochs)", group="length", metavar="N")
    epochs: float = option(1.0, help="passes over the data when --max-steps is unset", group="length")
    stop_at_step: int | None = option(None, help="end this run after step N of the schedule --max-steps/--epochs "
                                      "set (its learning rate keeps that schedule), writing a checkpoint and the "
                                      "adapter so far; --resume with a later N (or none) continues it. For runs "
                                      "longer than one sitting", group="length", metavar="N", resumable=True)
    batch_size: int = option(32, help="global batch: examples per optimizer step over all processes and "
                             "accumulation steps", group="optimisation", metavar="N")
    grad_accum: int = option(1, help="micro-batches per step (contrastive negatives come from the same "
                             "micro-batch, so prefer --mini-batch-size for large contrastive batches; MNTP's loss is "
                             "the token mean over the whole step)", group="optimisation", metavar="N")
    lr: float = option(2e-4, help="peak learning rate of AdamW", group="optimisation")
    warmup_ratio: float = option(0.1, help="share of the steps with a linear warmup; then linear decay to 0",
                                 group="optimisation")
    weight_decay: float = option(0.0, help="AdamW weight decay", group="optimisation")
    max_grad_norm: float = option(1.0, help="clip the global gradient norm to this", group="optimisation")
    max_length: int = option(128, help="tokens per text, longer are cut", group="optimisation", metavar="N")
    group_by_length: bool = option(False, help="batch texts of similar length together (shuffled batches, still "
                                   "without duplicate texts): much less padding, so faster on CPU; contrastive "
                                   "negatives then have similar lengths", group="optimisation")
    seed: int = option(42, help="seeds LoRA init, data order, masking and dropout", group="optimisation")
    lora_r: int = option(16, help="LoRA rank r", group="LoRA")
    lora_alpha: float = option(32.0, help="LoRA alpha (scaling alpha / r)", group="LoRA")
    lora_dropout: float = option(0.05, help="dropout on the LoRA input", group="LoRA")
    target_modules: list[str] = option(help="projections that get LoRA", group="LoRA", nargs="+", metavar="NAME",
                                       default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    pooling: str = option("mean", help="pooling trained with; latent_attention trains NV-Embed's head too",
                          choices=POOLING_MODES, objectives=CONTRASTIVE)
    dtype: str = option("auto", help="compute dtype: frozen weights in it and autocast to it (LoRA stays float32); "
                        "auto = bfloat16 on a CUDA GPU with bf16 and on a CPU with native bf16 instructions "
                        "(AVX512_BF16 or AMX), float32 elsewhere", group="running", choices=DTYPE_CHOICES,
                        alias=("--bf16", "bfloat16"))
    allow_slow_dtype: bool = option(False, help="train in bfloat16/float16 on a CPU that only emulates them (about "
                                    "30x slower than float32) instead of refusing", group="running", resumable=True)
    gradient_checkpointing: bool = option(False, help="recompute layer activations in the backward pass: less "
                                          "memory, about a third slower", group="running", resumable=True)
    attn_implementation: str = option("auto", help="attention backend (auto: sdpa on CUDA, eager on CPU, where it "
                                      "trains faster)", group="running", choices=ATTN_IMPLEMENTATIONS)
    device: str | None = option(None, help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK under "
                                "torchrun)", group="running")
    threads: int | None = option(None, help="torch CPU threads (default: torch's choice)", group="running",
                                 metavar="N", resumable=True)
    save_every: int = option(0, help="write a checkpoint every N steps (0: never)", group="running", metavar="N",
                             resumable=True)
    keep_checkpoints: int = option(2, help="how many of the newest checkpoints to keep", group="running",
                                   metavar="N", resumable=True)
    eval_sts: str | None = option(None, help="STS file (e.g. sts-dev.csv) scored during training", group="running",
                                  metavar="FILE", resumable=True)
    eval_every: int = option(0, help="score --eval-sts every N steps (it is always scored at the end)",
                             group="running", metavar="N", resumable=True)
    report_to: list[str] = option(help="where the trainer logs besides the console: tensorboard, wandb, ... (any "
                                  "integration transformers supports and finds installed; logs go to "
                                  "DIR-checkpoints)", group="running", nargs="+", metavar="NAME",
                                  default_factory=list, resumable=True)
    log_every: int = option(10, help="log loss and throughput every N steps", group="running", metavar="N",
                            resumable=True)
    resume: bool = option(False, help="continue from the newest checkpoint in DIR-checkpoints (same arguments "
                          "required); the result equals an uninterrupted run", group="running", resumable=True)
    overwrite: bool = option(False, help="replace an existing --out (only once the new adapter is complete) and old "
                             "checkpoints", group="running", resumable=True)
    show_progress: bool | None = option(None, help="do not show the tqdm progress bar", group="running",
                                        flag="--no-progress", action="store_false", resumable=True)
    cache_dir: str | None = option(None, help="where the embedded default model is cached", group="running",
                                   metavar="DIR")
    command: str | None = option(None, help="the command line that started the run (recorded)", cli=False,
                                 resumable=True)
    # MNTP
    mask_probability: float = option(0.2, help="share of tokens masked (80% mask token, 10% random, 10% kept)",
                                     objectives=("mntp",))
    mask_token: str | None = option(None, help="the token used as mask (default: the tokenizer's, else '_' as "
                                    "LLM2Vec)", objectives=("mntp",), metavar="TOKEN")
    # SimCSE and supervised
    temperature: float | None = option(None, help="softmax temperature (default: 0.05 simcse, 0.02 supervised)",
                                       objectives=CONTRASTIVE)
    attention_dropout: float | None = option(None, help="attention dropout while training (default: 0.3 simcse, "
                                             "as LLM2Vec; 0 supervised)", objectives=CONTRASTIVE)
    mini_batch_size: int | None = option(None, help="GradCache: embed each batch in chunks of N texts and "
                                         "back-propagate chunk by chunk, so memory is that of N texts whatever "
                                         "--batch-size (InfoNCE: CachedMultipleNegativesRankingLoss; same gradients)",
                                         objectives=CONTRASTIVE, metavar="N")
    matryoshka_dims: list[int] | None = option(None, help="train Matryoshka embeddings: the loss is also applied "
                                               "to the first D dimensions for each D of a comma-separated list "
                                               "(e.g. 64,128,256,576); convert records them", objectives=CONTRASTIVE,
                                               metavar="D,D,...", parse="int_list")
    # supervised
    recipe: str | None = option(None, help="a JSON or YAML file listing datasets (path, format, instruction, "
                                "prompt_name, loss, max_examples, mine_negatives), instead of --data",
                                objectives=("supervised",), metavar="FILE")
    loss: str = option("auto", help="InfoNCE for triples, CoSENT for scored pairs (auto: by the data)",
                       choices=LOSSES, objectives=("supervised",))
    data_format: str = option("auto", help="data format (auto: by suffix and header)", flag="--format",
                              choices=DATA_FORMATS, objectives=("supervised",))
    positive_threshold: float | None = option(None, help="scored pairs: keep pairs scored at or above SCORE as "
                                              "InfoNCE positives", objectives=("supervised",), metavar="SCORE")
    max_negatives: int | None = option(None, help="triples: keep each record's first N hard negatives (for files "
                                       "whose records list different numbers; a record with fewer is refused)",
                                       objectives=("supervised",), metavar="N")
    instruction: str | None = option(None, help="task instruction for queries without their own (for CoSENT pairs: "
                                     "both texts)", objectives=("supervised",), metavar="TEXT")
    instruction_template: str = option(DEFAULT_INSTRUCTION_TEMPLATE, help="how an instruction is written before a "
                                       "text, {instruction} marking where (default: 'Instruct: {instruction}\\n"
                                       "Query:\\n'; a shell writes newlines with $'...'); recorded in the adapter "
                                       "for convert. Ending in a newline lets stock Sentence Transformers leave it "
                                       "out of pooling exactly", objectives=("supervised",), metavar="TEMPLATE")
    cosent_scale: float = option(20.0, help="CoSENT's scale (1/temperature)", objectives=("supervised",))

    def validate(self) -> None:
        """Refuse impossible settings before any work, naming the option to change."""
        dropout = self.attention_dropout or 0.0
        checks = [
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}"),
            (bool(self.data) != bool(self.recipe), "give --data files or a --recipe (one of them)"),
            (self.recipe is None or self.objective == "supervised", "--recipe is for supervised training"),
            (self.mini_batch_size is None or self.mini_batch_size >= 1, "--mini-batch-size must be at least 1"),
            (not self.matryoshka_dims or all(d >= 1 for d in self.matryoshka_dims),
             "--matryoshka-dims must be positive integers"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.stop_at_step is None or self.stop_at_step >= 1, "--stop-at-step must be at least 1"),
            (self.stop_at_step is None or self.max_steps is None or self.stop_at_step <= self.max_steps,
             "--stop-at-step must not exceed --max-steps"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.max_length >= 4, "--max-length must be at least 4"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (0 <= self.lora_dropout < 1 and 0 <= dropout < 1, "dropouts must be in [0, 1)"),
            (0 < self.mask_probability < 1, "--mask-probability must be in (0, 1)"),
            (self.pooling in POOLING_MODES, f"--pooling must be one of {', '.join(POOLING_MODES)}"),
            (self.temperature is None or self.temperature > 0, "--temperature must be positive"),
            (self.loss in LOSSES, f"--loss must be {', '.join(LOSSES)}"),
            ("{instruction}" in self.instruction_template,
             f"--instruction-template must contain the placeholder {{instruction}}, where each instruction goes "
             f"(e.g. {DEFAULT_INSTRUCTION_TEMPLATE!r}); got {self.instruction_template!r}"),
            (self.data_format in DATA_FORMATS, f"--format must be {', '.join(DATA_FORMATS)}"),
            (self.save_every >= 0 and self.eval_every >= 0, "--save-every and --eval-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (not (self.base and self.gguf), "give --base or --gguf, not both"),
            (self.dtype in DTYPE_CHOICES, f"--dtype must be one of {', '.join(DTYPE_CHOICES)}"),
            (self.attn_implementation in ATTN_IMPLEMENTATIONS,
             f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"Invalid training arguments: {message}.")

    def resolved(self) -> TrainingArguments:
        """A copy with the per-objective defaults filled in (`temperature`, `attention_dropout`): what a run with
        these arguments trains, and what its outputs record."""
        values = {}
        if self.objective in CONTRASTIVE:
            if self.temperature is None:
                values["temperature"] = DEFAULT_TEMPERATURE[self.objective]
            if self.attention_dropout is None:
                values["attention_dropout"] = DEFAULT_ATTENTION_DROPOUT[self.objective]
        elif self.attention_dropout is None:
            values["attention_dropout"] = 0.0
        return dataclasses.replace(self, **values)

    @property
    def checkpoint_dir(self) -> Path:
        out = Path(self.out).expanduser().absolute()
        return out.with_name(f"{out.name}-checkpoints")


def resumable_fields() -> tuple[str, ...]:
    """Arguments that may change between an interrupted run and its resumption without changing the result."""
    return tuple(f.name for f in dataclasses.fields(TrainingArguments) if f.metadata.get("resumable"))


def saved_arguments(saved: dict) -> TrainingArguments:
    """Training arguments as a run saved them (`training_args.json`, a checkpoint's state), resolved, in today's
    fields: an earlier version's `bf16: true/false` is `dtype: "bfloat16"/"float32"`, its missing
    `instruction_template` the one it wrote instructions with (`weights.lora.trained_instruction_template`), and
    other fields added since take their defaults."""
    saved = dict(saved)
    if "bf16" in saved:
        bf16 = saved.pop("bf16")
        saved.setdefault("dtype", "bfloat16" if bf16 else "float32")
    saved.setdefault("instruction_template", trained_instruction_template(saved) or DEFAULT_INSTRUCTION_TEMPLATE)
    known = {item.name for item in dataclasses.fields(TrainingArguments)}
    return TrainingArguments(**{key: value for key, value in saved.items() if key in known}).resolved()


__all__ = [
    "DEFAULT_ATTENTION_DROPOUT",
    "DEFAULT_TARGET_MODULES",
    "DEFAULT_TEMPERATURE",
    "OBJECTIVES",
    "TrainingArguments",
    "option",
    "resumable_fields",
    "saved_arguments",
]
