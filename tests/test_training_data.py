"""Training data: the readers (what they return, and the file:line errors for bad records), recipe files listing a
run's datasets, and the batches the trainer builds from several datasets."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from llama_encoder.configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, fill_instruction_template
from llama_encoder.training.contrastive import named_prompts, read_training_sets
from llama_encoder.training.data import ScoredPair, Triple, read_supervised, read_texts
from llama_encoder.training.recipe import read_recipe, specs_from_files


def test_texts_skip_blank_lines_and_keep_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first\n\n  \nsecond\r\nthird")
    assert read_texts(path) == ["first", "second", "third"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no text"), ("\n \n\n", "holds no text"), ("ok\nbad\x00line\n", r"t.txt:2: the line holds a NUL")],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "t.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_texts(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No training data at .*nope.txt"):
        read_texts(tmp_path / "nope.txt")


def test_jsonl_triples(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [{"query": "q1", "positive": "p1", "negatives": ["n1"], "instruction": "Find"},
               {"query": "q2", "positive": "p2", "negatives": ["n2"]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    data = read_supervised(path)
    assert data.triples == [Triple("q1", "p1", ("n1",), "Find"), Triple("q2", "p2", ("n2",), None)]
    assert data.pairs == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"query": "q", "positive": "p"}', "{not json"], r"d.jsonl:2: not valid JSON"),
        (['{"query": "q"}'], r"d.jsonl:1: missing field 'positive'"),
        (['{"query": "", "positive": "p"}'], r"d.jsonl:1: query must be a non-empty string"),
        (['{"query": "q", "positive": 3}'], r"d.jsonl:1: positive must be a non-empty string"),
        (['["q", "p"]'], r"d.jsonl:1: expected a JSON object"),
        (['{"query": "q", "positive": "p", "negatives": [1]}'], r"d.jsonl:1: negatives must be a list"),
        (['{"query": "q", "positive": "p", "negatives": ["a"]}', '{"query": "q", "positive": "p"}'],
         r"different numbers of hard negatives \(\[0, 1\]\)"),
        ([""], "holds no training records"),
    ],
)
def test_bad_jsonl_records(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_supervised(path)


def test_csv_triples_and_a_missing_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('query,positive,negative\n"where, then?",here,there\nq2,p2,n2\n')
    assert read_supervised(path).triples[0] == Triple("where, then?", "here", ("there",), None)
    path.write_text("query,answer\nq,a\n")
    with pytest.raises(ValueError, match=r"d.csv:1: the header must name query and positive"):
        read_supervised(path, data_format="csv")


def test_sts_pairs_and_threshold(tmp_path):
    path = tmp_path / "sts.tsv"
    rows = ["main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.",
            "main-captions\tMSRvid\t2012test\t0004\t2.500\tA man is playing.\tA man plays a flute.",
            "main-captions\tMSRvid\t2012test\t0005\t4.000\tA cat.\tThe cat."]
    path.write_text("\n".join(rows) + "\n")
    data = read_supervised(path)
    assert data.pairs[1] == ScoredPair("A man is playing.", "A man plays a flute.", 2.5)
    kept = read_supervised(path, positive_threshold=4.0)
    assert kept.pairs == [] and [t.query for t in kept.triples] == ["A plane is taking off.", "A cat."]
    with pytest.raises(ValueError, match="No pair is scored at or above --positive-threshold 5.5"):
        read_supervised(path, positive_threshold=5.5)
    path.write_text(rows[0] + "\nbroken line\n")
    with pytest.raises(ValueError, match=r"sts.tsv:2: expected 7 tab-separated fields"):
        read_supervised(path)


# --- recipes: the datasets of a run -----------------------------------------------------------------------------


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _recipe(path, datasets: list[dict], **top) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe = {"datasets": datasets, **top}
    if path.suffix == ".json":
        path.write_text(json.dumps(recipe, indent=2))
        return path
    lines = [f"{key}: {json.dumps(value)}" for key, value in top.items()] + ["datasets:"]
    for entry in datasets:  # written by hand, as a person would (JSON strings are YAML strings)
        lines += [("  - " if i == 0 else "    ") + f"{key}: {json.dumps(value)}" for i, (key, value) in
                  enumerate(entry.items())]
    path.write_text("# two datasets, each with its own instruction\n" + "\n".join(lines) + "\n")
    return path


TRIPLES = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(4)]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipes_read_paths_from_their_folder_with_an_instruction_per_dataset(tmp_path, suffix):
    _jsonl(tmp_path / "data" / "qa.jsonl", TRIPLES)
    (tmp_path / "data" / "sts.csv").write_text("score,sentence1,sentence2\n4,a,b\n1,c,d\n")
    recipe = _recipe(tmp_path / "recipes" / f"mix{suffix}", [
        {"name": "qa", "path": "../data/qa.jsonl", "instruction": "Answer the question", "max_examples": 3},
        {"path": "../data/sts.csv", "format": "sts", "loss": "cosent", "instruction": "Find a paraphrase"},
    ])
    specs = read_recipe(recipe)
    assert [spec.name for spec in specs] == ["qa", "sts"]  # a name defaults to the file's stem
    assert [Path(spec.path) for spec in specs] == [(tmp_path / "data" / "qa.jsonl").resolve(),
                                                    (tmp_path / "data" / "sts.csv").resolve()]
    assert [spec.instruction for spec in specs] == ["Answer the question", "Find a paraphrase"]
    assert (specs[0].max_examples, specs[1].format, specs[1].loss) == (3, "sts", "cosent")
    sets = read_training_sets("supervised", specs, instruction_template=DEFAULT_INSTRUCTION_TEMPLATE, seed=0)
    assert [(s.name, s.kind, len(s)) for s in sets] == [("qa", "infonce", 3), ("sts", "cosent", 2)]
    assert sets[0].prompts == {"anchor": "Instruct: Answer the question\nQuery:\n"}  # documents get none
    assert sets[1].prompts == {"sentence1": "Instruct: Find a paraphrase\nQuery:\n",
                               "sentence2": "Instruct: Find a paraphrase\nQuery:\n"}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_recipe_refuses_an_unknown_key_naming_it_and_the_recipe(tmp_path, suffix):
    _jsonl(tmp_path / "qa.jsonl", TRIPLES)
    recipe = _recipe(tmp_path / f"r{suffix}", [{"name": "qa", "path": "qa.jsonl", "instrution": "Typo"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(recipe))}: dataset 1: unknown key\(s\) instrution; "
                                         "known keys: .*instruction"):
        read_recipe(recipe)
    recipe = _recipe(tmp_path / f"top{suffix}", [{"name": "qa", "path": "qa.jsonl"}], seed=3)
    with pytest.raises(ValueError, match=rf"{re.escape(str(recipe))}: unknown key\(s\) seed"):
        read_recipe(recipe)


def test_a_recipe_refuses_missing_files_and_duplicate_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No recipe file at .*nope.yaml"):
        read_recipe(tmp_path / "nope.yaml")
    _jsonl(tmp_path / "qa.jsonl", TRIPLES)
    recipe = _recipe(tmp_path / "r.json", [{"name": "qa", "path": "qa.jsonl"}, {"name": "web", "path": "web.jsonl"}])
    with pytest.raises(FileNotFoundError, match=r"r.json: dataset 2 \(web\): no data file at .*web.jsonl"):
        read_recipe(recipe)
    recipe = _recipe(tmp_path / "r.json", [{"name": "qa", "path": "qa.jsonl"}, {"name": "qa", "path": "qa.jsonl"}])
    with pytest.raises(ValueError, match=r"r.json: dataset name\(s\) qa appear more than once"):
        read_recipe(recipe)
    recipe.write_text('{"datasets": []}')
    with pytest.raises(ValueError, match="a recipe needs a non-empty 'datasets' list"):
        read_recipe(recipe)


def test_records_with_their_own_instruction_become_datasets_of_their_own(tmp_path):
    records = [{"query": "q1", "positive": "p1", "instruction": "Find a rhyme"},
               {"query": "q2", "positive": "p2"},
               {"query": "q3", "positive": "p3", "instruction": "Find a rhyme"}]
    path = _jsonl(tmp_path / "words.jsonl", records)
    specs = specs_from_files([str(path)], data_format="auto", instruction="Find a synonym", loss="auto",
                             positive_threshold=None)
    sets = read_training_sets("supervised", specs, instruction_template=DEFAULT_INSTRUCTION_TEMPLATE, seed=0)
    assert [(s.name, s.instruction, s.columns["anchor"]) for s in sets] == [
        ("words-0", "Find a rhyme", ["q1", "q3"]), ("words-1", "Find a synonym", ["q2"])]
    assert [s.prompts["anchor"] for s in sets] == ["Instruct: Find a rhyme\nQuery:\n",
                                                   "Instruct: Find a synonym\nQuery:\n"]
    # the dataset's own instruction keeps the dataset's prompt name; the records' own is named like its set
    assert named_prompts(sets) == {"words-0": "Find a rhyme", "words": "Find a synonym"}


def test_task_prompts_are_named_per_dataset_and_may_be_shared_by_one_instruction(tmp_path):
    for name in ("squad", "nq", "sts"):
        _jsonl(tmp_path / f"{name}.jsonl", TRIPLES)
    recipe = _recipe(tmp_path / "r.yaml", [
        {"name": "squad", "path": "squad.jsonl", "instruction": "Retrieve the answer", "prompt_name": "query"},
        {"name": "nq", "path": "nq.jsonl", "instruction": "Retrieve the answer", "prompt_name": "query"},
        {"name": "sts", "path": "sts.jsonl", "instruction": "Retrieve a paraphrase"},
    ])
    sets = read_training_sets("supervised", read_recipe(recipe), instruction_template=DEFAULT_INSTRUCTION_TEMPLATE,
                              seed=0)
    assert [(s.name, s.prompt_name) for s in sets] == [("squad", "query"), ("nq", "query"), ("sts", "sts")]
    assert named_prompts(sets) == {"query": "Retrieve the answer", "sts": "Retrieve a paraphrase"}


def test_one_prompt_name_for_two_instructions_or_a_reserved_one_is_refused_naming_the_entry(tmp_path):
    for name in ("a", "b", "document"):
        _jsonl(tmp_path / f"{name}.jsonl", TRIPLES)
    recipe = _recipe(tmp_path / "r.json", [
        {"name": "a", "path": "a.jsonl", "instruction": "Find the answer", "prompt_name": "task"},
        {"name": "b", "path": "b.jsonl", "instruction": "Find the pet", "prompt_name": "task"},
    ])
    with pytest.raises(ValueError, match=rf"{re.escape(str(recipe))}: dataset 2 \(b\): its instruction 'Find the "
                                         r"pet' would be prompt 'task', which dataset 1 \(a\) trains with 'Find the "
                                         r"answer'"):
        read_recipe(recipe)
    recipe = _recipe(tmp_path / "r.json", [{"name": "a", "path": "a.jsonl", "instruction": "x", "prompt_name": "a b"}])
    with pytest.raises(ValueError, match=r"dataset 1 \(a\): prompt_name 'a b' must be letters, digits"):
        read_recipe(recipe)
    recipe = _recipe(tmp_path / "r.json", [{"path": "document.jsonl", "instruction": "Find it"}])
    with pytest.raises(ValueError, match=r"dataset 1 \(document\): prompt_name 'document' is reserved.*the "
                                         "dataset's name"):
        read_recipe(recipe)
    # a dataset without an instruction names no prompt
    recipe = _recipe(tmp_path / "r.json", [{"path": "document.jsonl"}])
    assert read_recipe(recipe)[0].name == "document"
    # records' own instructions are named like their set, which another dataset's prompt name may not reuse
    _jsonl(tmp_path / "mixed.jsonl", [{**TRIPLES[0], "instruction": "Find a rhyme"}, TRIPLES[1]])
    recipe = _recipe(tmp_path / "r.json", [
        {"name": "mixed", "path": "mixed.jsonl", "instruction": "Find a synonym"},
        {"name": "b", "path": "b.jsonl", "instruction": "Find the pet", "prompt_name": "mixed-0"},
    ])
    sets = read_training_sets("supervised", read_recipe(recipe), instruction_template=DEFAULT_INSTRUCTION_TEMPLATE,
                              seed=0)
    with pytest.raises(ValueError, match=r"Dataset b \(.*b.jsonl\): its instruction 'Find the pet' would be prompt "
                                         "'mixed-0', which dataset mixed-0 trains with 'Find a rhyme'"):
        named_prompts(sets)


# --- the batches a run trains on --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tests.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("data-base"))


def test_each_batch_comes_from_one_dataset_without_duplicates_and_in_proportion(tiny_base, tmp_path):
    """The trainer's own dataloader over four datasets (two recipe entries, and a file whose records carry two
    instructions): each batch is one dataset's, repeats no text (in qa each negative is another record's positive),
    pools the query without its dataset's prompt and the documents whole, and over an epoch each dataset gives
    batches in proportion to its size."""
    from llama_encoder.training.arguments import TrainingArguments
    from llama_encoder.training.run import prepare_run

    qa = [{"query": f"question {i}?", "positive": f"answer {i}", "negatives": [f"answer {(i + 1) % 12}"]}
          for i in range(12)]
    pets = [{"query": f"Which pet is {i}?", "positive": f"pet {i}", "negatives": [f"cat {i}"]} for i in range(6)]
    words = [{"query": f"word {i}", "positive": f"rhyme {i}", "negatives": [f"no rhyme {i}"],
              "instruction": "Find a rhyme"} for i in range(6)]
    words += [{"query": f"term {i}", "positive": f"synonym {i}", "negatives": [f"antonym {i}"]} for i in range(3)]
    for name, records in (("qa", qa), ("pets", pets), ("words", words)):
        _jsonl(tmp_path / f"{name}.jsonl", records)
    recipe = _recipe(tmp_path / "recipe.yaml", [
        {"name": "qa", "path": "qa.jsonl", "instruction": "Answer the question"},
        {"name": "pets", "path": "pets.jsonl", "instruction": "Find the pet"},
        {"name": "words", "path": "words.jsonl", "instruction": "Find a synonym"},
    ])
    run = prepare_run(TrainingArguments(objective="supervised", recipe=str(recipe), out=str(tmp_path / "adapter"),
                                        base=str(tiny_base), batch_size=3, dtype="float32", show_progress=False))
    instructions = {s.name: s.instruction for s in run.sets}
    assert instructions == {"qa": "Answer the question", "pets": "Find the pet", "words-0": "Find a rhyme",
                            "words-1": "Find a synonym"}
    sizes = {s.name: len(s) for s in run.sets}
    texts = {s.name: {text for column in s.columns.values() for text in column} for s in run.sets}
    tokenizer = run.model.tokenizer

    counts = Counter()
    for batch in run.trainer.get_train_dataloader():
        name = batch["dataset_name"]
        counts[name] += 1
        prompt = fill_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, instructions[name])
        seen = []
        for column in ("anchor", "positive", "negative_1"):
            ids, attention, pool = (batch[f"{column}_{key}"] for key in ("input_ids", "attention_mask", "pool_mask"))
            assert ids.shape[0] == 3
            if column != "anchor":  # documents carry no prompt: every real token is pooled
                assert torch.equal(pool, attention), (name, column)
            for row in range(ids.shape[0]):
                real, pooled = attention[row].bool(), pool[row].bool()
                assert not (pooled & ~real).any()
                prefix = tokenizer.decode(ids[row][real & ~pooled])
                text = tokenizer.decode(ids[row][pooled])
                if column == "anchor":  # the prompt's tokens (BOS included) are attended to, not pooled
                    assert prefix + text == tokenizer.bos_token + prompt + text.lstrip()
                    assert prefix.rstrip() == (tokenizer.bos_token + prompt).rstrip()
                else:
                    assert prefix == "" and text == tokenizer.bos_token + text.removeprefix(tokenizer.bos_token)
                seen.append(text.removeprefix(tokenizer.bos_token).strip())
        assert set(seen) <= texts[name], name  # all of the batch from one dataset
        assert len(set(seen)) == len(seen), (name, seen)  # no text twice
    assert counts == {name: size // 3 for name, size in sizes.items()} == {"qa": 4, "pets": 2, "words-0": 2,
                                                                           "words-1": 1}


# --- --group-by-length for contrastive runs -----------------------------------------------------------------------


def _grouped(rows: list[dict], batch_size: int, *, seed: int = 0, epoch: int = 0, deduplicate: bool = True):
    from datasets import Dataset

    from llama_encoder.training.sampler import LengthGroupedBatchSampler

    sampler = LengthGroupedBatchSampler(Dataset.from_list(rows), batch_size=batch_size, drop_last=True,
                                        valid_label_columns=["score"], seed=seed, deduplicate=deduplicate)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_grouped_batches_have_similar_lengths_no_duplicates_and_a_seeded_order():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (640,), generator=generator).tolist()
    shared = [f"shared text {i}" for i in range(40)]  # positives that several rows repeat
    rows = [{"anchor": "q" * n + str(i), "positive": shared[i % 40] if i % 3 == 0 else "p" * n + str(i)}
            for i, n in enumerate(lengths)]
    batches = _grouped(rows, 8)
    for batch in batches:
        texts = [text for index in batch for text in rows[index].values()]
        assert len(texts) == len(set(texts)), "a batch repeats a text"
    assert len({index for batch in batches for index in batch}) == sum(map(len, batches))  # no row twice

    def spread(batch):  # longest minus shortest row length in a batch
        sizes = [max(len(text) for text in rows[index].values()) for index in batch]
        return max(sizes) - min(sizes)

    generator = torch.Generator().manual_seed(1)
    random_batches = torch.randperm(len(rows), generator=generator).reshape(-1, 8).tolist()
    assert sum(map(spread, batches)) < sum(map(spread, random_batches)) / 5
    # most rows are used despite the duplicate rule, the order is drawn from (seed, epoch)
    assert sum(map(len, batches)) >= 0.9 * len(rows)
    assert _grouped(rows, 8) == batches and _grouped(rows, 8, epoch=1) != batches
    assert _grouped(rows, 8, seed=1) != batches


def test_grouped_pairs_need_no_deduplication():
    rows = [{"sentence1": "same sentence", "sentence2": f"other {i}", "score": float(i % 5)} for i in range(32)]
    assert sum(map(len, _grouped(rows, 4, deduplicate=False))) == 32
    assert _grouped(rows, 4) == []  # with the duplicate rule no two rows can share a batch


def test_max_negatives_keeps_each_records_first_negatives_and_refuses_records_with_fewer(tmp_path):
    records = [{"query": "q1", "positive": "p1", "negatives": ["n1a", "n1b"]},
               {"query": "q2", "positive": "p2", "negatives": ["n2a"]}]
    path = _jsonl(tmp_path / "nli.jsonl", records)
    with pytest.raises(ValueError, match=r"different numbers of hard negatives \(\[1, 2\]\).*max_negatives"):
        read_supervised(path)
    kept = read_supervised(path, max_negatives=1)
    assert [(t.query, t.negatives) for t in kept.triples] == [("q1", ("n1a",)), ("q2", ("n2a",))]
    assert [t.negatives for t in read_supervised(path, max_negatives=0).triples] == [(), ()]
    with pytest.raises(ValueError, match="1 of 2 triples in .*nli.jsonl have fewer than 2 hard negatives"):
        read_supervised(path, max_negatives=2)
    recipe = _recipe(tmp_path / "r.yaml", [{"name": "nli", "path": "nli.jsonl", "max_negatives": 1}])
    sets = read_training_sets("supervised", read_recipe(recipe), instruction_template=DEFAULT_INSTRUCTION_TEMPLATE,
                              seed=0)
    assert sets[0].columns == {"anchor": ["q1", "q2"], "positive": ["p1", "p2"], "negative_1": ["n1a", "n2a"]}
    bad = _recipe(tmp_path / "bad.yaml", [{"name": "nli", "path": "nli.jsonl", "max_negatives": -1}])
    with pytest.raises(ValueError, match="dataset 1 \\(nli\\): max_negatives must be 0 or more"):
        read_recipe(bad)
