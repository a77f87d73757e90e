"""lm-evaluation-harness, unmodified, against a live server: its stock `local-completions` client scores a tiny local
multiple-choice task and a rolling (perplexity) task for a mix of two adapter types, and every log-likelihood it
reports equals the one PeftMixedModel gives in-process, with its greedy flags right. On the embedded demo model,
whose greedy continuations are text (a choice can be one)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lm_eval import simple_evaluate  # the test extra (pyproject.toml)
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from server.config import DEMO_MODEL_DIR, Settings
from server.demo.corpus import prompts
from tests.conftest import REPO
from tests.reference import reference_model

STORE = REPO / "adapters_store"
MIX = ["pirate", "digits"]  # OFT and LoRA
MAX_LENGTH = 48  # lm_eval's max_length: rolling windows of 46 tokens, so the longer text spans several
TEXTS = ["Bob has two cats.", "Alice painted three gray boxes near the market, and Bob counted seven red kites."]


def encode(text: str) -> list[int]:
    return [byte + 3 for byte in text.encode()]  # ByT5's ids, as lm_eval's tokenizers send them


def decode(ids: list[int]) -> str:
    return bytes(i - 3 for i in ids).decode()


@pytest.fixture(scope="module")
def oracle():
    """log-likelihood and greedy flag of a continuation, under PeftMixedModel with the mix (or the base)."""
    models = {names: reference_model(DEMO_MODEL_DIR, STORE, list(names)) for names in (tuple(MIX), ())}

    @torch.no_grad()
    def score(names: tuple, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = context + continuation
        logits = models[names](torch.tensor([ids])).logits[0, len(context) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        taken = logprobs.gather(1, torch.tensor(continuation)[:, None])[:, 0]
        return float(taken.sum()), bool((logprobs.argmax(dim=-1) == torch.tensor(continuation)).all())

    def greedy(names: tuple, context: list[int], tokens: int) -> list[int]:
        ids = list(context)
        with torch.no_grad():
            for _ in range(tokens):
                ids.append(int(models[names](torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(context) :]

    score.greedy = greedy
    return score


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, oracle):
    """A multiple-choice task whose first choice is each context's greedy continuation under the mix and the others
    not, and a rolling task."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = []
    for sentence in prompts(3, seed=34):
        context = sentence[:20].rstrip()  # lm_eval moves a trailing space to the continuation
        answer = decode(oracle.greedy(tuple(MIX), encode(context), 5))
        docs.append({"context": context, "choices": [answer, "zq" + answer, "qz"], "label": 0})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "rolling.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cache = root / "datasets"
    (root / "mixmc.yaml").write_text(
        f"""task: mixmc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / "mc.jsonl"}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
    )
    (root / "mixrolling.yaml").write_text(
        f"""task: mixrolling
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / "rolling.jsonl"}}}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
    )
    return TaskManager(include_path=str(root)), docs


def evaluate(server, tasks, model: str, **extra) -> dict:
    manager, _ = tasks
    args = {"base_url": f"{server.url}/v1/completions", "model": model, "max_length": MAX_LENGTH, **extra}
    return simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["mixmc", "mixrolling"],
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )


def check(results: dict, tasks, oracle, names: tuple) -> None:
    _, docs = tasks
    samples = results["samples"]
    flags = []
    for sample in samples["mixmc"]:
        doc = sample["doc"]
        for choice, ((loglik, greedy),) in zip(doc["choices"], sample["resps"], strict=True):
            expected, expected_greedy = oracle(names, encode(doc["context"]), encode(choice))
            assert loglik == pytest.approx(expected, abs=1e-4), (doc["context"], choice)
            assert greedy == expected_greedy, (doc["context"], choice)
            flags.append(greedy)
    assert len(flags) == 3 * len(docs)
    if names == tuple(MIX):
        assert flags[0::3] == [True] * len(docs) and not any(flags[1::3]) and not any(flags[2::3])
        assert results["results"]["mixmc"]["acc,none"] == 1.0
    for sample in samples["mixrolling"]:
        tokens = encode(sample["doc"]["text"])
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, MAX_LENGTH - 2, context_len=1)]
        assert len(windows) > 1 or len(tokens) < MAX_LENGTH - 2
        expected = sum(oracle(names, context, continuation)[0] for context, continuation in windows)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)


def test_lm_eval_scores_a_mix_as_peft_does(serve, tasks, oracle, caplog):
    path = str(DEMO_MODEL_DIR)
    server = serve(Settings(model=path, adapters_dir=STORE, device="cpu", dtype="float32"))
    # batches of 4 prompts per request: the rows of a batch scored together
    results = evaluate(server, tasks, "+".join(MIX), tokenizer=path, tokenizer_backend="huggingface", batch_size=4)
    check(results, tasks, oracle, tuple(MIX))
    # the model's path as its id, no tokenizer given: lm_eval finds the server's own (/tokenizer_info, /tokenize)
    with caplog.at_level(logging.INFO, logger="lm_eval"):
        check(evaluate(server, tasks, f"{path}:{'+'.join(MIX)}"), tasks, oracle, tuple(MIX))
    assert "Using remote tokenizer backend" in caplog.text
    check(evaluate(server, tasks, path), tasks, oracle, ())
