"""Build tiny, randomly initialised models for demos and tests.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in about a second on the text
below, and the weights are random (seeded, so every build is identical). Output is gibberish by design;
the point is to exercise the whole serving path with no cluster, GPU or model hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS = ("text-generation", "text-classification", "token-classification")

# Small local corpus: enough variety for a BPE with ~1000 merges. Kept inline so the image and the tests
# need no data files.
_CORPUS = """
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules. Although practicality
beats purity. Errors should never pass silently. Unless explicitly silenced. In the face of ambiguity,
refuse the temptation to guess. There should be one and preferably only one obvious way to do it.
Now is better than never. Although never is often better than right now. If the implementation is hard
to explain, it's a bad idea. If the implementation is easy to explain, it may be a good idea.
Namespaces are one honking great idea, let's do more of those!
The quick brown fox jumps over the lazy dog. A Kubernetes operator watches custom resources and
reconciles deployments, services and autoscalers. The model server loads weights, warms up, reports
readiness and serves completions over HTTP. Alice lives in Paris and works with Bob in Berlin.
Continuous batching lets many requests share one forward pass of the transformer model.
User: hello, who are you? Assistant: I am a tiny demo model with random weights.
0 1 2 3 4 5 6 7 8 9 10 100 1000 { } [ ] ( ) < > = + - * / , . ; : ! ? ' " # @ $ % & | ~ ^ _ `
"""

_EOS = "<|endoftext|>"
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
_CLS_LABELS = ["negative", "positive"]
_MARKER = "gptd-demo.json"

# Sizes: "tiny" keeps tests fast; "small" is the benchmark model (a bit more compute per token).
_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1000},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 2000},
}


def _train_tokenizer(vocab_size: int, chat_template: bool) -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    bpe.train_from_iterator(lines * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=[_EOS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=_EOS, eos_token=_EOS, unk_token=_EOS, pad_token=_EOS
    )
    if chat_template:
        tok.chat_template = _CHAT_TEMPLATE
    return tok


def build_demo_model(
    path: str | Path,
    task: str = "text-generation",
    *,
    size: str = "tiny",
    chat_template: bool = False,
    seed: int = 0,
) -> Path:
    """Build (or reuse, if already built with the same options) a tiny HF-format model directory.

    `chat_template=True` stores a simple chat template in the tokenizer; without it the server must use its
    plain-text fallback. Returns the model directory.
    """
    import torch
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2ForTokenClassification,
        GPT2LMHeadModel,
    )

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(_SIZES)}")
    out = Path(path)
    options = {"task": task, "size": size, "chat_template": chat_template, "seed": seed}
    marker = out / _MARKER
    # Cached: an identical earlier build is reused (the marker is written last, so a half-written
    # directory from an interrupted build is rebuilt).
    if marker.is_file() and json.loads(marker.read_text()) == options:
        return out

    dims = _SIZES[size]
    tok = _train_tokenizer(dims["vocab_size"], chat_template)
    eos_id = tok.convert_tokens_to_ids(_EOS)
    kwargs: dict[str, Any] = {
        "n_layer": dims["n_layer"],
        "n_embd": dims["n_embd"],
        "n_head": dims["n_head"],
        "vocab_size": len(tok),
        "n_positions": 1024,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    if task == "text-classification":
        labels = _CLS_LABELS
    elif task == "token-classification":
        labels = _NER_LABELS
    else:
        labels = []
    if labels:
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
    config = GPT2Config(**kwargs)

    torch.manual_seed(seed)
    model_cls = {
        "text-generation": GPT2LMHeadModel,
        "text-classification": GPT2ForSequenceClassification,
        "token-classification": GPT2ForTokenClassification,
    }[task]
    model = model_cls(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    marker.write_text(json.dumps(options))
    return out
